"""The hash-chained ledger every party keeps: one JSON line per message that crossed.

Each entry carries its sequence number, the SHA-256 of the previous entry (the first chains to
:data:`GENESIS`) and of itself, so a line edited, deleted, inserted or reordered breaks the chain.
The ledger is tamper-evident, not tamper-proof: whoever can rewrite a whole file can rebuild its
chain; cross-checking site against server (``common/fl/audit.py``) closes that gap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Message

from common.fl.contract import CONFIG, K_PHASE, QUERY_SITE, STAGE

GENESIS = "0" * 64  # what the first entry of every ledger chains to
LEDGER_NAME = "ledger.jsonl"
SERVER = "server"
SITE = "site"


def canonical(entry: Mapping[str, Any]) -> str:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON, without its own ``hash`` field."""
    return hashlib.sha256(
        canonical({k: v for k, v in entry.items() if k != "hash"}).encode()
    ).hexdigest()


def _last_line(f) -> bytes:
    f.seek(0, os.SEEK_END)
    pos = f.tell()
    buf = b""
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        if buf.rstrip(b"\n").count(b"\n") >= 1:
            break
    lines = buf.rstrip(b"\n").split(b"\n")
    return lines[-1] if lines and lines[-1] else b""


def _chain_after(last: bytes) -> tuple[str, int]:
    """(prev hash, seq) for the entry that follows the line ``last`` (b"" = an empty ledger)."""
    if not last:
        return GENESIS, 1
    try:
        prev_entry = json.loads(last)
        return prev_entry.get("hash") or entry_hash(prev_entry), int(prev_entry.get("seq", 0)) + 1
    except (ValueError, TypeError):
        return hashlib.sha256(last).hexdigest(), -1  # a damaged tail: audit will say so


class Ledger:
    """Append-only, hash-chained JSON lines; safe for several processes (``flock``)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, entry: Mapping[str, Any]) -> dict:
        """Append ``entry`` with ``seq``, ``prev`` and ``hash`` filled in.

        Returns:
            The entry as written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                prev, seq = _chain_after(_last_line(f))
                out = {**entry, "seq": seq, "prev": prev}
                out["hash"] = entry_hash(out)
                f.seek(0, os.SEEK_END)
                f.write((canonical(out) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return out


def now() -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + f".{int(time.time() * 1000) % 1000:03d}Z"
    )


def message_entry(
    party: str,
    direction: str,
    msg: Message,
    records: list[dict] | None,
    *,
    run_id: int | None,
    site: str,
    role: str,
    phase: str = "",
    src_node: int | None = None,
    dst_node: int | None = None,
    **extra: Any,
) -> dict:
    """A ledger entry for one message (request or reply) as ``party`` saw it cross."""
    md = msg.metadata
    return {
        "event": "message",
        "time": now(),
        "run_id": run_id,
        "party": party,
        "site": site,
        "role": role,
        "direction": direction,
        "message_type": md.message_type,
        "phase": phase,
        "group_id": md.group_id,
        "message_id": md.message_id or "",
        "reply_to": md.reply_to_message_id or "",
        "src_node": int(src_node if src_node is not None else md.src_node_id),
        "dst_node": int(dst_node if dst_node is not None else md.dst_node_id),
        "records": records or [],
        **{k: v for k, v in extra.items() if v not in (None, "")},
    }


def phase_of(records: list[dict], message_type: str) -> str:
    """The workflow phase a described request belongs to (from its stage record)."""
    for rec in records:
        if rec["name"] == STAGE and rec["type"] == CONFIG:
            return str(rec["config"].get(K_PHASE, ""))
    return "discover" if message_type == QUERY_SITE else ""


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the code that decides what may cross (contract, description, schema, guard):
    recorded in every ledger so an auditor knows which rules enforced it."""
    from common.fl import contract, describe, guard, schema

    h = hashlib.sha256()
    for module in (contract, describe, schema, guard):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


@dataclass
class LedgerFile:
    path: Path
    entries: list[tuple[int, dict]]  # (line number, entry)
    chain_error: str = ""

    @property
    def head(self) -> str:
        return self.entries[-1][1].get("hash", "") if self.entries else GENESIS


def _chain_problem(entry: dict, expected_seq: int, prev: str) -> str:
    """Why ``entry`` does not continue the chain at ``expected_seq`` after ``prev``
    ("" = it does)."""
    if entry.get("hash") != entry_hash(entry):
        return "the entry does not match its own hash: edited"
    seq = entry.get("seq")
    if seq != expected_seq:
        what = "deleted" if isinstance(seq, int) and seq > expected_seq else "inserted or reordered"
        return f"seq {seq} where {expected_seq} belongs: a line was {what}"
    if entry.get("prev") != prev:
        return "does not chain to the line before it: a line was deleted, inserted or reordered"
    return ""


def read_ledger(path: Path) -> LedgerFile:
    """Parse a ledger and verify its chain; ``chain_error`` names the first bad line."""
    path = Path(path)
    out = LedgerFile(path, [])
    prev = GENESIS
    for no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError as err:
            out.chain_error = out.chain_error or f"{path}:{no}: not a JSON entry ({err}): edited"
            continue
        out.entries.append((no, entry))
        if not out.chain_error:
            problem = _chain_problem(entry, len(out.entries), prev)
            out.chain_error = f"{path}:{no}: {problem}" if problem else ""
            prev = entry.get("hash", "")
    return out
