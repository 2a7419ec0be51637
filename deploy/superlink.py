"""``crossprobe-superlink``: Flower 1.42's ``flower-superlink``, with patience for its SQLite lock.

A deployment's SuperLink keeps its state (runs, messages, and the weights inside them) in one
SQLite file, and Flower sets ``busy_timeout`` to 5 s: a request that waits longer for the write
lock fails with "database is locked" (HTTP 500). Some of Flower's own transactions hold that lock
while they do seconds of Python work (``pull_messages`` walks a message's object tree: 1.4 s of CPU
for the demo model), so on a machine whose cores the training also uses they outlast 5 s; and a
SuperNode, or the ServerApp executor, that gets a 500 exits, which fails the run. Measured on
2 cores with training and two busy loops beside the SuperLink: transactions of up to 5.7 s.

Waiting longer for the lock is all it takes: the transactions end, they are just slow. The wait
stays under the 30 s read timeout of Flower's HTTP clients, so a waiting request still answers.
Everything else, the command line included, is Flower's.
"""

from __future__ import annotations

import sys

from flwr.supercore import sql_mixin
from flwr.superlink.cli import flower_superlink

BUSY_TIMEOUT_MS = 20_000


def with_busy_timeout(pragmas: tuple, ms: int) -> tuple:
    """Flower's SQLite pragmas with ``busy_timeout`` set to ``ms``; it must be one of them (or
    this wrapper would silently do nothing on a Flower that renamed it)."""
    names = [name for name, _ in pragmas]
    if "busy_timeout" not in names:
        raise RuntimeError(f"Flower's SQLite pragmas no longer set busy_timeout: {names}")
    return tuple((name, str(ms) if name == "busy_timeout" else value) for name, value in pragmas)


def wait_longer_for_the_lock(ms: int = BUSY_TIMEOUT_MS) -> None:
    """Every SQLite connection Flower opens from now on waits up to ``ms`` for a lock (sql_mixin
    applies its module-level SQLITE_PRAGMAS to each one as it connects)."""
    sql_mixin.SQLITE_PRAGMAS = with_busy_timeout(sql_mixin.SQLITE_PRAGMAS, ms)


def main() -> None:
    wait_longer_for_the_lock()
    sys.argv[0] = "flower-superlink"  # Flower's usage and error messages name its command
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
