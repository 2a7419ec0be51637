"""Turn the signals that stop a command (SIGTERM from ``kill`` or ``timeout``, SIGHUP from a closed
terminal) into an exception, so ``finally`` blocks run: whatever a command started is stopped and
what it wrote is left consistent. SIGINT already raises ``KeyboardInterrupt``."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """The process was asked to stop (a BaseException, like KeyboardInterrupt: ``except
    Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise :class:`Stopped` (main thread only; elsewhere
    the block runs unchanged, as Python allows handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
