"""One run at a time per run folder: an exclusive ``flock`` on ``<folder>/.lock``.

The kernel releases the lock when the holder exits, however it exits (a crash or ``kill -9``
included), so a stale lock file never blocks the next run; the file only tells a second run who
holds the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError

LOCK_NAME = ".lock"


class FolderLocked(UserError):
    """Another process is using this run folder; the message names its PID."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def locked(folder: Path, command: str) -> Iterator[None]:
    """Hold ``folder`` for the duration of the block.

    Raises:
        FolderLocked: another process holds it (the message names its PID and command).
        OSError: the folder cannot be created or written (a file, a read-only disk).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(
                f"{folder} is in use by {_holder(fd)}; wait for it to finish or stop it first"
            ) from None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        info = json.dumps({"pid": os.getpid(), "command": command, "since": since}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
