"""``python -m crossprobe`` is the ``crossprobe`` command."""

from crossprobe.cli import main

main()
