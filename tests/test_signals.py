"""SIGTERM and SIGHUP become an exception inside a command, so its ``finally`` blocks run."""

from __future__ import annotations

import os
import signal

import pytest

from common.signals import Stopped, stop_signals_raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_and_cleanup_runs(sig):
    cleaned, before = [], signal.getsignal(sig)  # SIG_IGN under nohup: it is restored too
    with pytest.raises(Stopped) as err, stop_signals_raise():
        try:
            os.kill(os.getpid(), sig)
            signal.sigtimedwait([], 0)  # let the handler run
        finally:
            cleaned.append(True)
    assert cleaned == [True] and err.value.signum == sig
    assert signal.getsignal(sig) is before


def test_handlers_are_restored_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_raise():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_stopped_is_not_swallowed_by_except_exception():
    assert not issubclass(Stopped, Exception)
