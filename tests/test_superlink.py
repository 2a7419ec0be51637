"""crossprobe-superlink: Flower's SuperLink, waiting 20 s instead of 5 s for its SQLite write lock.

On a host whose cores also train, Flower's own transactions hold that lock for longer than 5 s; the
request that waits behind one then fails "database is locked" (HTTP 500) and the SuperNode or
ServerApp executor that sent it exits. Here another connection holds the lock for 6 s, as such a
transaction does, while a Flower store writes.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from sqlalchemy.exc import OperationalError

from deploy.superlink import BUSY_TIMEOUT_MS, wait_longer_for_the_lock, with_busy_timeout

HELD_S = 6.0  # longer than Flower's 5 s, shorter than our 20 s


def hold_the_write_lock(database: Path, seconds: float) -> threading.Thread:
    """A connection that takes the database's write lock, as a long Flower transaction does, and
    lets it go after ``seconds``; returns once the lock is held."""
    held = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(database, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        held.set()
        threading.Event().wait(seconds)
        con.execute("COMMIT")
        con.close()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    return thread


def register_an_object(store: SqlObjectStore) -> list[str]:
    """A write through Flower's own store (what a SuperNode's pushed reply does first)."""
    object_id = hashlib.sha256(b"weights").hexdigest()
    return store.preregister(run_id=1, object_tree=ObjectTree(object_id=object_id))


@pytest.mark.parametrize("patient", [False, True], ids=["flower's 5 s", "crossprobe's 20 s"])
def test_a_write_behind_a_6_s_transaction_fails_on_flowers_wait_and_succeeds_on_ours(
    tmp_path, monkeypatch, patient
):
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after
    if patient:
        wait_longer_for_the_lock()
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()
    holder = hold_the_write_lock(tmp_path / "state.db", HELD_S)
    try:
        if patient:
            assert register_an_object(store) == [hashlib.sha256(b"weights").hexdigest()]
        else:
            with pytest.raises(OperationalError, match="database is locked"):
                register_an_object(store)
    finally:
        holder.join()


def test_only_the_busy_timeout_changes_and_a_flower_without_it_is_refused():
    flowers = sql_mixin.SQLITE_PRAGMAS
    ours = with_busy_timeout(flowers, BUSY_TIMEOUT_MS)
    assert dict(ours) == {**dict(flowers), "busy_timeout": str(BUSY_TIMEOUT_MS)}
    with pytest.raises(RuntimeError, match="busy_timeout"):
        with_busy_timeout((("journal_mode", "WAL"),), BUSY_TIMEOUT_MS)


def test_crossprobe_superlink_is_flowers_command_line():
    command = Path(sys.executable).parent / "crossprobe-superlink"
    out = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: flower-superlink" in out.stdout and "--database" in out.stdout
