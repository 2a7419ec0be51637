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


def _tail(fd: int) -> tuple[int, bytes, bytes]:
    """(where the last complete line ends, that line, the bytes after it). A ledger whose last
    byte is not a newline ends in a line cut short by a crash: those bytes are the torn tail."""
    size = os.lseek(fd, 0, os.SEEK_END)
    buf, pos = b"", size
    while pos > 0 and buf.count(b"\n") < 2:
        step = min(4096, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
    cut = buf.rfind(b"\n") + 1  # 0 when no complete line
    torn = buf[cut:]
    complete = buf[:cut].rstrip(b"\n")
    last = complete[complete.rfind(b"\n") + 1 :] if complete else b""
    return size - len(torn), last, torn


def _chain_after(last: bytes) -> tuple[str, int]:
    """(prev hash, seq) for the entry that follows the line ``last`` (b"" = an empty ledger)."""
    if not last:
        return GENESIS, 1
    try:
        prev_entry = json.loads(last)
        return prev_entry.get("hash") or entry_hash(prev_entry), int(prev_entry.get("seq", 0)) + 1
    except (ValueError, TypeError, AttributeError):
        return hashlib.sha256(last).hexdigest(), -1  # a damaged line: audit will say so


def _write_line(fd: int, entry: Mapping[str, Any], last: bytes) -> tuple[dict, bytes]:
    """Chain ``entry`` after ``last`` and write it as one line in one write; (entry, its line)."""
    prev, seq = _chain_after(last)
    out = {**entry, "seq": seq, "prev": prev}
    out["hash"] = entry_hash(out)
    line = canonical(out).encode()
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, line + b"\n")
    return out, line


class Ledger:
    """Append-only, hash-chained JSON lines; safe for several processes (``flock``) and for
    crashes: each entry is one write of a whole line, then fsync; a line cut short by a crash is
    moved to ``<ledger>.torn`` and replaced by a ``repair`` entry before the next append."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _repair(self, fd: int, keep: int, last: bytes, torn: bytes) -> bytes:
        with open(self.path.with_name(self.path.name + ".torn"), "ab") as f:
            f.write(torn + b"\n")
        os.ftruncate(fd, keep)
        _, line = _write_line(
            fd,
            {
                "event": "repair",
                "time": now(),
                "torn_bytes": len(torn),
                "torn_sha256": hashlib.sha256(torn).hexdigest(),
                "note": "a line cut short by a crash was removed (kept in the .torn file)",
            },
            last,
        )
        return line

    def append(self, entry: Mapping[str, Any]) -> dict:
        """Append ``entry`` with ``seq``, ``prev`` and ``hash`` filled in.

        Returns:
            The entry as written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keep, last, torn = _tail(fd)
            if torn:
                last = self._repair(fd, keep, last, torn)
            out, _ = _write_line(fd, entry, last)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
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
    """SHA-256 over the code that decides what may cross and how it is signed (contract,
    description, schema, guard, signing): recorded in every ledger so an auditor knows which rules
    enforced it."""
    from common.fl import contract, describe, guard, schema, signing

    h = hashlib.sha256()
    for module in (contract, describe, schema, guard, signing):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


@dataclass
class LedgerFile:
    path: Path
    entries: list[tuple[int, dict]]  # (line number, entry)
    chain_error: str = ""
    torn: str = ""  # the last line was cut short by a crash (not an edit)

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


_MESSAGE_FIELDS = {
    "party": str,
    "direction": str,
    "message_type": str,
    "src_node": int,
    "dst_node": int,
    "records": list,
}


_CHAIN_FIELDS = {"seq": int, "prev": str, "hash": str}


def _shape_problem(entry: dict) -> str:
    """What a writer never leaves out of an entry, or "" when it is all there."""
    for key, kind in _CHAIN_FIELDS.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"field {key!r} is missing or not a {kind.__name__}"
    if entry.get("event") != "message":
        return ""
    for key, kind in _MESSAGE_FIELDS.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"field {key!r} is missing or not a {kind.__name__}"
    if entry["direction"] not in ("in", "out"):
        return f"direction {entry['direction']!r}"
    for rec in entry["records"]:
        if not (isinstance(rec, dict) and isinstance(rec.get("name"), str)):
            return "a record without a name"
        if not isinstance(rec.get("type"), str):
            return f"record {rec['name']!r} without a type"
        arrays = rec.get("arrays", [])
        if not isinstance(arrays, list) or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and "sha256" in a for a in arrays
        ):
            return f"record {rec['name']!r} has malformed arrays"
    return ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (a writer never writes it)")


def _parse_entry(raw: bytes) -> dict:
    """One ledger line as an entry. Raises ValueError: not a JSON object, or malformed."""
    try:
        entry = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason})") from None
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    if problem := _shape_problem(entry):
        raise ValueError(problem)
    return entry


def read_ledger(path: Path) -> LedgerFile:
    """Parse a ledger and verify its chain; ``chain_error`` names the first bad line, ``torn``
    a last line cut short by a crash (repaired by the next append)."""
    path = Path(path)
    out = LedgerFile(path, [])
    prev = GENESIS
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1].strip():  # no newline at the end: the last write was cut short
        out.torn = f"{path}:{len(lines)}: the last line ({len(lines[-1])} bytes) was cut short"
        lines = lines[:-1]
    for no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = _parse_entry(raw)
        except ValueError as err:
            out.chain_error = out.chain_error or f"{path}:{no}: not a valid entry ({err}): edited"
            continue
        out.entries.append((no, entry))
        if not out.chain_error:
            problem = _chain_problem(entry, len(out.entries), prev)
            out.chain_error = f"{path}:{no}: {problem}" if problem else ""
            prev = entry.get("hash", "")
    return out
