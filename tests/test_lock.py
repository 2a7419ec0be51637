"""A run folder is used by one run at a time; the second is told who holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from common.lock import FolderLocked, locked


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    busy = rf"in use by PID {os.getpid()} \(crossprobe simulate"
    with (
        locked(tmp_path, "crossprobe simulate"),
        pytest.raises(FolderLocked, match=busy),
        locked(tmp_path, "crossprobe simulate"),
    ):
        pass
    with locked(tmp_path, "again"):  # released on exit
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal
        from common.lock import locked
        with locked({str(tmp_path)!r}, "doomed"):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert res.returncode == -9
    with locked(tmp_path, "next run"):
        pass
