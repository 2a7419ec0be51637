"""The one base class of every error a user can cause and fix: a bad config key, a broken data
folder, a busy run folder. The message names the file, row, key or holder; the command line prints
it as one line (exit code 2) instead of a traceback."""


class UserError(ValueError):
    """Bad input, named in the message (subclasses: ``ConfigError``, ``DataError``,
    ``FolderLocked``)."""
