"""Proof that only weights cross: the guard (fail closed), the hash-chained ledger, ``audit_run``.

Three pieces, one rule set:

- :func:`describe` turns a message's records into plain JSON (record names and types; for each
  array its name, shape, dtype, bytes and the SHA-256 of the bytes that cross; config keys and
  values; metric names, scalar values and list lengths). Each array is hashed once, from the
  ``Array.data`` buffer itself.
- :func:`check` is the one contract check, applied to such a description: by the site's guard
  before a reply leaves (:class:`Guard`, a ClientApp mod), by the server on everything it receives
  (``server/workflow.py``), and by the auditor to every ledger line. Records must be allowed for the
  message type and role (``protocol.ALLOWED_*_RECORDS``); every array must be a parameter of the
  model the experiment config describes (name, shape, dtype, and the ``.npy`` payload must be
  exactly that array); metric values must be numbers, lists only per-image/per-video score vectors
  no longer than the number of evaluated images.
- :class:`Ledger` appends one JSON line per message, each carrying the SHA-256 of the previous
  entry (the first chains to :data:`GENESIS`) and of itself; :func:`audit_run` verifies the chains,
  re-applies :func:`check`, and matches what each site sent with what the server received (and
  vice versa) by array hash.

The ledger is tamper-evident, not tamper-proof: whoever can rewrite a whole file can rebuild its
chain. Publishing the head hash elsewhere (or cross-checking site against server) closes that gap.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.config import ExperimentConfig, ModelConfig
from common.fl import protocol as p

GENESIS = "0" * 64  # what the first entry of every ledger chains to
LEDGER_NAME = "ledger.jsonl"
SERVER = "server"
SITE = "site"

# Bounds for what may ride in scalar records (a frame must not fit through them).
MAX_METRIC_KEYS = 256  # keys per MetricRecord
MAX_CARD_KEYS = 32  # keys in a site card (an honest one has 15)
MAX_STR = 128  # characters per key name, and per config string in a reply
SCORE_RECORDS = frozenset(
    {p.SCORES, p.VIDEO_SCORES, p.PATIENT_SCORES}
)  # the only records that may carry lists

# `crossprobe audit` exit codes (most serious wins).
EXIT_OK, EXIT_NO_LEDGER, EXIT_CHAIN, EXIT_CONTRACT, EXIT_MISMATCH = 0, 1, 3, 4, 5


class ContractViolation(p.ProtocolError):
    """A message carries something the wire contract or the model schema does not allow."""


# ================================================================== model schema
@lru_cache(maxsize=8)
def _schemas(model_json: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], ...]:
    import torch

    from common.models import TransUNet, encoder_schema

    cfg = ModelConfig.model_validate_json(model_json)
    enc = {
        k: (tuple(s), str(d).removeprefix("torch.")) for k, (s, d) in encoder_schema(cfg).items()
    }
    with torch.device("meta"):  # no memory, no checkpoint loading: names, shapes, dtypes only
        model = TransUNet(cfg, num_classes=1)
    full = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
    return enc, full


def model_schema(cfg: ExperimentConfig, record: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of the state dict that may ride in ``record`` (encoder or model.*)."""
    enc, full = _schemas(cfg.model.model_dump_json())
    return enc if record == p.ENCODER else full


def schema_bytes(schema: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Bytes of a state dict with this schema (sum of nbytes)."""
    return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in schema.values())


def _dtype_ok(wire: str, expected: str) -> bool:
    # fp16 on the wire is fine for floating-point parameters
    return wire == expected or (
        expected.startswith(("float", "bfloat")) and wire in ("float16", "float32")
    )


@lru_cache(maxsize=32)
def _experiment(flat_json: str) -> ExperimentConfig:
    return p.unflatten_experiment(json.loads(flat_json))


def experiment_of(records: list[dict]) -> ExperimentConfig | None:
    """The experiment config carried in a (described) request, or None (query.site)."""
    for rec in records:
        if rec["name"] == p.EXPERIMENT and rec["type"] == "ConfigRecord":
            return _experiment(json.dumps(rec["config"], sort_keys=True))
    return None


# ================================================================== describe
def _json_scalar(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan", "inf": JSON has no non-finite numbers
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    return v


def _npy_header(data: bytes) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype, header length) of an ``.npy`` payload, without copying it."""
    fp = io.BytesIO(data)  # shares the bytes buffer (no copy until written)
    version = np.lib.format.read_magic(fp)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _fortran, dtype = read(fp)
    return tuple(int(x) for x in shape), str(dtype), fp.tell()


def describe_array(name: str, arr: Array) -> dict:
    """One array as the ledger records it. ``bytes`` is the payload size after the .npy header,
    ``sha256`` covers ``Array.data`` exactly as it crosses (header included), hashed in place."""
    data = arr.data
    out: dict[str, Any] = {
        "name": name,
        "shape": [int(x) for x in arr.shape],
        "dtype": str(arr.dtype),
    }
    try:
        shape, dtype, header = _npy_header(data) if arr.stype == "numpy.ndarray" else ((), "", 0)
        if arr.stype != "numpy.ndarray":
            out["payload"] = f"stype {arr.stype!r} is not numpy.ndarray"
        elif list(shape) != out["shape"] or dtype != out["dtype"]:
            out["payload"] = (
                f"payload is {list(shape)} {dtype}, declared {out['shape']} {out['dtype']}"
            )
        elif len(data) - header != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            out["payload"] = (
                f"payload has {len(data) - header} bytes, {list(shape)} {dtype} needs fewer"
            )
    except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is not a parameter
        header = 0
        out["payload"] = f"not an .npy array ({type(err).__name__}: {err})"
    out["bytes"] = len(data) - header
    out["sha256"] = hashlib.sha256(data).hexdigest()
    return out


def describe_record(name: str, record: Any) -> dict:
    if isinstance(record, ArrayRecord):
        return {
            "name": name,
            "type": "ArrayRecord",
            "arrays": [describe_array(k, a) for k, a in record.items()],
        }
    if isinstance(record, MetricRecord):
        metrics: dict[str, Any] = {}
        for k, v in record.items():
            if isinstance(v, list):
                ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
                metrics[k] = (
                    {"len": len(v)} if ok else {"len": len(v), "type": "list of non-numbers"}
                )
            elif isinstance(v, int | float) and not isinstance(v, bool):
                metrics[k] = _json_scalar(v)
            else:
                metrics[k] = {"type": type(v).__name__}
        return {"name": name, "type": "MetricRecord", "metrics": metrics}
    if isinstance(record, ConfigRecord):
        config = {
            k: [_json_scalar(x) for x in v] if isinstance(v, list) else _json_scalar(v)
            for k, v in record.items()
        }
        return {"name": name, "type": "ConfigRecord", "config": config}
    return {"name": name, "type": type(record).__name__}


def describe(content: RecordDict) -> list[dict]:
    """Every record of a message as plain JSON (see the module docstring)."""
    return [describe_record(name, rec) for name, rec in content.items()]


def array_bytes(records: Iterable[dict]) -> int:
    return sum(a["bytes"] for r in records for a in r.get("arrays", ()))


# ================================================================== the one check
def _expected_type(name: str) -> str | None:
    t = p.ArrayRecord if name.startswith(p.MODEL_PREFIX) else p.RECORD_TYPES.get(name)
    return t.__name__ if t is not None else None


def _allowed(kind: str, message_type: str, role: str) -> frozenset[str]:
    if kind == "request":
        table = p.ALLOWED_REQUEST_RECORDS
        key = (
            (message_type, p.ANY_ROLE)
            if (message_type, p.ANY_ROLE) in table
            else (message_type, role)
        )
    else:
        table, key = p.ALLOWED_REPLY_RECORDS, (message_type, role)
    if key not in table:
        raise ContractViolation(
            f"no {message_type!r} {kind} is allowed {'to' if kind == 'request' else 'from'} a {role!r} site"
        )
    return table[key]


def _check_arrays(what: str, rec: dict, cfg: ExperimentConfig | None) -> None:
    if cfg is None:
        raise ContractViolation(
            f"{what}: weights {rec['name']!r} without an experiment config to check them against"
        )
    schema = model_schema(cfg, rec["name"])
    arrays = {a["name"]: a for a in rec["arrays"]}
    if len(arrays) != len(rec["arrays"]):
        raise ContractViolation(f"{what}: record {rec['name']!r} repeats an array name")
    extra = sorted(set(arrays) - set(schema))
    if extra:
        a = arrays[extra[0]]
        raise ContractViolation(
            f"{what}: array {extra[0]!r} {a['shape']} {a['dtype']} in {rec['name']!r} is not a model "
            f"parameter ({len(extra)} unexpected)"
        )
    for k, a in arrays.items():
        shape, dtype = schema[k]
        if tuple(a["shape"]) != shape or not _dtype_ok(a["dtype"], dtype):
            raise ContractViolation(
                f"{what}: array {k!r} in {rec['name']!r} is {a['shape']} {a['dtype']}, "
                f"the model parameter is {list(shape)} {dtype}"
            )
        if "payload" in a:
            raise ContractViolation(f"{what}: array {k!r} in {rec['name']!r}: {a['payload']}")
    missing = sorted(set(schema) - set(arrays))
    if missing:
        raise ContractViolation(
            f"{what}: record {rec['name']!r} lacks {len(missing)} parameter(s), e.g. {missing[:3]}"
        )


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) or v in ("nan", "inf", "-inf")


def _check_metrics(what: str, rec: dict, limit: int) -> None:
    metrics = rec["metrics"]
    if len(metrics) > MAX_METRIC_KEYS:
        raise ContractViolation(
            f"{what}: {rec['name']!r} has {len(metrics)} metrics (at most {MAX_METRIC_KEYS})"
        )
    for k, v in metrics.items():
        if len(k) > MAX_STR:
            raise ContractViolation(
                f"{what}: a metric name in {rec['name']!r} has {len(k)} characters"
            )
        if _num(v):
            continue
        if isinstance(v, dict) and set(v) == {"len"}:
            if rec["name"] not in SCORE_RECORDS:
                raise ContractViolation(
                    f"{what}: metric {k!r} in {rec['name']!r} is a list; only score vectors may be"
                )
            if v["len"] > limit:
                raise ContractViolation(
                    f"{what}: metric {k!r} in {rec['name']!r} is a list of {v['len']} numbers, "
                    f"more than the {limit} evaluated image(s)"
                )
            continue
        raise ContractViolation(
            f"{what}: metric {k!r} in {rec['name']!r} is not a number or list of numbers ({v})"
        )


def _check_config(what: str, rec: dict) -> None:
    config = rec["config"]
    if len(config) > MAX_CARD_KEYS:
        raise ContractViolation(
            f"{what}: {rec['name']!r} has {len(config)} keys (at most {MAX_CARD_KEYS})"
        )
    for k, v in config.items():
        if len(k) > MAX_STR:
            raise ContractViolation(f"{what}: a key in {rec['name']!r} has {len(k)} characters")
        if isinstance(v, list | dict) or (isinstance(v, str) and len(v) > MAX_STR):
            raise ContractViolation(f"{what}: {rec['name']!r} key {k!r} is not a short scalar")


def check(
    kind: str,
    message_type: str,
    role: str,
    records: list[dict],
    cfg: ExperimentConfig | None,
    max_list: int | None = None,
) -> None:
    """The contract, on a :func:`describe`d message. ``kind`` is "request" or "reply"; ``role`` the
    site's; ``cfg`` the experiment of the request (weights are checked against its model);
    ``max_list`` an outside bound on score-vector lengths (the server: the site's labeled test count).

    Raises:
        ContractViolation: naming the first record, array or metric that may not cross.
    """
    what = f"{message_type} {kind} {'to' if kind == 'request' else 'from'} {role or '?'}"
    allowed = _allowed(kind, message_type, role)
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        raise ContractViolation(f"{what}: a record name repeats")
    for rec in records:
        key = p.MODEL_PREFIX if rec["name"].startswith(p.MODEL_PREFIX) else rec["name"]
        if key not in allowed:
            raise ContractViolation(
                f"{what}: record {rec['name']!r} is not allowed (allowed: {sorted(allowed)})"
            )
        if rec["type"] != _expected_type(rec["name"]):
            raise ContractViolation(
                f"{what}: record {rec['name']!r} must be a {_expected_type(rec['name'])}"
            )
    if kind == "request":
        for rec in records:
            if rec["type"] == "ArrayRecord":
                _check_arrays(what, rec, cfg)
        return
    n = next((r["metrics"].get(p.NUM_EXAMPLES) for r in records if r["name"] == p.METRICS), None)
    limit = int(n) if isinstance(n, int | float) and not isinstance(n, bool) and n >= 0 else 0
    if max_list is not None:
        limit = min(limit, max_list)
    for rec in records:
        if rec["type"] == "ArrayRecord":
            _check_arrays(what, rec, cfg)
        elif rec["type"] == "MetricRecord":
            _check_metrics(what, rec, limit)
        elif rec["type"] == "ConfigRecord":
            _check_config(what, rec)


def check_reply(
    message_type: str,
    role: str,
    content: RecordDict,
    cfg: ExperimentConfig | None,
    max_list: int | None = None,
) -> list[dict]:
    """Describe and check a reply in one pass; returns the description (hashes computed once)."""
    records = describe(content)
    check("reply", message_type, role, records, cfg, max_list)
    return records


# ================================================================== the ledger
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


class Ledger:
    """Append-only, hash-chained JSON lines; safe for several processes (``flock``)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, entry: Mapping[str, Any]) -> dict:
        """Append ``entry`` with ``seq``, ``prev`` and ``hash`` filled in; returns what was written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                last = _last_line(f)
                if last:
                    try:
                        prev_entry = json.loads(last)
                        prev, seq = (
                            prev_entry.get("hash") or entry_hash(prev_entry),
                            int(prev_entry.get("seq", 0)) + 1,
                        )
                    except (ValueError, TypeError):
                        prev, seq = (
                            hashlib.sha256(last).hexdigest(),
                            -1,
                        )  # a damaged tail: audit will say so
                else:
                    prev, seq = GENESIS, 1
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
    for rec in records:
        if rec["name"] == p.STAGE and rec["type"] == "ConfigRecord":
            return str(rec["config"].get(p.K_PHASE, ""))
    return "discover" if message_type == p.QUERY_SITE else ""


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the guard's own source and the wire contract (what enforced this ledger)."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(p.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


# ================================================================== the guard (ClientApp mod)
@dataclass(frozen=True)
class SiteInfo:
    name: str
    role: str
    out_dir: Path


class Guard:
    """ClientApp mod: check every request and every reply, log both in the site's ledger.

    ``site_of(context)`` returns the site this node already knows it is (or None before its first
    ``query.site`` in simulation). A reply that fails :func:`check` raises ContractViolation: Flower
    turns it into an error reply naming the violation, and nothing of it is uploaded.
    """

    def __init__(self, site_of: Callable[[Context], SiteInfo | None]):
        self.site_of = site_of

    def _log(
        self,
        site: SiteInfo | None,
        context: Context,
        direction: str,
        msg: Message,
        records,
        **extra,
    ) -> None:
        """One ledger line; ``msg`` is always the request (an "out" line is its reply)."""
        if site is None:
            return  # the node does not know its site (setup error): no folder to write to
        md, me = msg.metadata, context.node_id
        entry = message_entry(
            SITE,
            direction,
            msg,
            records,
            run_id=context.run_id,
            site=site.name,
            role=site.role,
            phase=extra.pop("phase"),
            src_node=md.src_node_id if direction == "in" else me,
            dst_node=me if direction == "in" else md.src_node_id,
            code=code_digest(),
            **extra,
        )
        if direction == "out":
            entry["message_id"], entry["reply_to"] = "", md.message_id or ""
        Ledger(site.out_dir / LEDGER_NAME).append(entry)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        mtype = msg.metadata.message_type
        site = self.site_of(context)
        if mtype != p.QUERY_SITE and site is None:
            raise ContractViolation(f"{mtype}: this site has not been discovered (query.site) yet")
        request = describe(msg.content) if msg.has_content() else []
        phase = phase_of(request, mtype)
        logged_in = False
        try:
            cfg = experiment_of(request)
            if mtype != p.QUERY_SITE:
                check("request", mtype, site.role, request, cfg)
            if site is not None:  # log what came in before running anything
                self._log(site, context, "in", msg, request, phase=phase)
                logged_in = True
            reply = call_next(msg, context)
        except Exception as err:
            site = site or self.site_of(context)
            if not logged_in:
                self._log(site, context, "in", msg, request, phase=phase)
            self._log(
                site, context, "out", msg, [], phase=phase, error=f"{type(err).__name__}: {err}"
            )
            raise
        site = site or self.site_of(context)  # query.site: known only after the handler ran
        if not logged_in:
            self._log(site, context, "in", msg, request, phase=phase)
        if not reply.has_content():
            reason = reply.error.reason if reply.has_error() else "no content"
            self._log(site, context, "out", msg, [], phase=phase, error=reason)
            return reply
        records = describe(reply.content)
        try:
            check("reply", mtype, site.role if site else "", records, cfg)
        except ContractViolation as err:
            # nothing is sent; the ledger keeps what was blocked, for the site's own investigation
            self._log(site, context, "out", msg, [], phase=phase, refused=str(err), blocked=records)
            raise
        self._log(site, context, "out", msg, records, phase=phase)
        return reply


# ================================================================== verify / audit
@dataclass
class LedgerFile:
    path: Path
    entries: list[tuple[int, dict]]  # (line number, entry)
    chain_error: str = ""

    @property
    def head(self) -> str:
        return self.entries[-1][1].get("hash", "") if self.entries else GENESIS


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
        if out.chain_error:
            continue
        expected_seq = len(out.entries)
        if entry.get("hash") != entry_hash(entry):
            out.chain_error = f"{path}:{no}: the entry does not match its own hash: edited"
        elif entry.get("seq") != expected_seq:
            what = (
                "deleted"
                if isinstance(entry.get("seq"), int) and entry["seq"] > expected_seq
                else "inserted or reordered"
            )
            out.chain_error = f"{path}:{no}: seq {entry.get('seq')} where {expected_seq} belongs: a line was {what}"
        elif entry.get("prev") != prev:
            out.chain_error = f"{path}:{no}: does not chain to the line before it: a line was deleted, inserted or reordered"
        prev = entry.get("hash", "")
    return out


@dataclass
class AuditReport:
    ledgers: list[LedgerFile] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    contract: list[str] = field(default_factory=list)
    mismatch: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: defaultdict(int)
    )  # (party, phase, dir)
    model_bytes: dict[str, int] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def exit_code(self) -> int:
        if not self.ledgers:
            return EXIT_NO_LEDGER
        for code, errs in (
            (EXIT_CHAIN, self.chain),
            (EXIT_CONTRACT, self.contract),
            (EXIT_MISMATCH, self.mismatch),
        ):
            if errs:
                return code
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def render(self) -> str:
        mb = lambda n: f"{n / 2**20:10.3f} MB"  # noqa: E731
        lines = ["ledgers:"]
        for lf in self.ledgers:
            lines.append(f"  {lf.path}  {len(lf.entries)} entries  head {lf.head[:16]}")
        if self.model_bytes:
            lines.append(
                "model sizes: "
                + ", ".join(f"{k} {mb(v).strip()} ({v} B)" for k, v in self.model_bytes.items())
            )
        if self.bytes:
            lines.append("array bytes per phase and direction (as each party logged them):")
            lines.append(f"  {'party':<22}{'phase':<10}{'dir':<5}{'bytes':>14}{'':>14}")
            for (party, phase, d), n in sorted(self.bytes.items()):
                lines.append(f"  {party:<22}{phase or '-':<10}{d:<5}{n:>14}{mb(n):>14}")
        lines.append("checked: " + ", ".join(f"{v} {k}" for k, v in sorted(self.checked.items())))
        for title, errs in (
            ("CHAIN BROKEN", self.chain),
            ("CONTRACT VIOLATION", self.contract),
            ("MISMATCH site vs server", self.mismatch),
            ("note", self.notes),
        ):
            lines += [f"{title}: {e}" for e in errs[:50]]
            if len(errs) > 50:
                lines.append(f"{title}: … {len(errs) - 50} more")
        verdict = {
            EXIT_OK: "PASS: only declared model weights and bounded scalars crossed; ledgers agree",
            EXIT_NO_LEDGER: "FAIL: no ledger found",
            EXIT_CHAIN: "FAIL: a ledger chain is broken",
            EXIT_CONTRACT: "FAIL: something outside the contract crossed",
            EXIT_MISMATCH: "FAIL: site and server ledgers disagree",
        }[self.exit_code]
        lines.append(verdict)
        return "\n".join(lines)


def _find_site_ledgers(site_dir: Path) -> list[Path]:
    site_dir = Path(site_dir)
    if site_dir.is_file():
        return [site_dir]
    if (site_dir / LEDGER_NAME).is_file():
        return [site_dir / LEDGER_NAME]
    return sorted(site_dir.glob(f"*/{LEDGER_NAME}"))  # deployment: <out-dir>/run-<id>/ledger.jsonl


def _check_ledger(lf: LedgerFile, rep: AuditReport) -> None:
    """Re-apply :func:`check` to every message in one ledger; collect bytes per phase."""
    requests: dict[Any, dict] = {}  # message_id or (node, group) -> request entry
    for no, e in lf.entries:
        if e.get("event") != "message":
            continue
        where = f"{lf.path}:{no}"
        party = e.get("party", "?")
        is_request = (party == SERVER and e["direction"] == "out") or (
            party == SITE and e["direction"] == "in"
        )
        node = (
            e["dst_node"]
            if party == SERVER and is_request
            else e["src_node"]
            if party == SERVER
            else None
        )
        key = (e.get("site"), e.get("group_id"), e.get("message_type"), node)
        records = e.get("records", [])
        label = f"{party}:{e.get('site')}" if party == SITE else SERVER
        rep.bytes[(label, e.get("phase", ""), e["direction"])] += array_bytes(records)
        try:
            if is_request:
                requests[key] = e
                if e.get("message_id"):
                    requests[e["message_id"]] = e
                cfg = experiment_of(records)
                if cfg is not None and not rep.model_bytes:
                    rep.model_bytes = {
                        "encoder": schema_bytes(model_schema(cfg, p.ENCODER)),
                        "model": schema_bytes(model_schema(cfg, p.MODEL)),
                    }
                if e["message_type"] != p.QUERY_SITE:
                    check("request", e["message_type"], e.get("role", ""), records, cfg)
                rep.checked["requests"] += 1
            else:
                req = requests.get(e.get("reply_to")) or requests.get(key)
                cfg = experiment_of(req.get("records", [])) if req else None
                rep.checked["replies"] += 1
                if e.get("refused") and party == SITE:
                    rep.notes.append(
                        f"{where}: {label} refused a reply ({e['refused']}); nothing was sent"
                    )
                elif e.get("refused"):
                    rep.contract.append(
                        f"{where}: the server received a reply outside the contract "
                        f"(and refused it): {e['refused']}"
                    )
                    continue
                if records:
                    check("reply", e["message_type"], e.get("role", ""), records, cfg)
        except (ContractViolation, p.ProtocolError, ValueError) as err:
            rep.contract.append(f"{where}: {err}")


def _digest(e: dict) -> list:
    """What must agree between the two ends of one message: records and array hashes."""
    return sorted(
        (
            r["name"],
            r["type"],
            tuple(sorted((a["name"], a["sha256"]) for a in r.get("arrays", ()))),
            canonical(r.get("metrics", r.get("config", {}))) if r["type"] != "ArrayRecord" else "",
        )
        for r in e.get("records", [])
    )


def _cross_check(
    server: LedgerFile, sites: list[LedgerFile], rep: AuditReport, expect: set[str]
) -> None:
    """Every message the server logged must appear in that site's ledger with the same hashes."""

    def key(e: dict, node: int) -> tuple:
        return (e.get("run_id"), node, e.get("group_id"), e.get("message_type"), e["direction"])

    flip = {"in": "out", "out": "in"}
    site_side: dict[tuple, list[tuple[Path, int, dict]]] = defaultdict(list)
    by_name: set[str] = set()  # sites whose ledgers were given
    for lf in sites:
        for no, e in lf.entries:
            if e.get("event") == "message":
                node = e["dst_node"] if e["direction"] == "in" else e["src_node"]
                site_side[key(e, node)].append((lf.path, no, e))
                by_name.add(e.get("site", ""))
    seen_sites: set[str] = set()
    used: set[int] = set()
    names = {
        e["src_node"]: e["site"]
        for _, e in server.entries
        if e.get("event") == "message" and e["direction"] == "in" and e.get("site")
    }
    for no, e in server.entries:
        if e.get("event") != "message":
            continue
        node = e["dst_node"] if e["direction"] == "out" else e["src_node"]
        name = e.get("site") or names.get(node, "")
        if name not in by_name:
            if name in expect:
                rep.mismatch.append(
                    f"{server.path}:{no}: no ledger for site {name!r} (expected under its folder)"
                )
                expect.discard(name)
            continue
        seen_sites.add(name)
        k = (e.get("run_id"), node, e.get("group_id"), e.get("message_type"), flip[e["direction"]])
        cands = [c for c in site_side.get(k, []) if id(c[2]) not in used]
        if not cands:
            if name in by_name:
                rep.mismatch.append(
                    f"{server.path}:{no}: the server {'sent' if e['direction'] == 'out' else 'received'} "
                    f"{e['message_type']} ({e.get('group_id')}) that site {name!r}'s ledger does not show"
                )
            continue
        path, sno, se = cands[0]
        used.add(id(se))
        if e["direction"] == "in" and e.get("error") and se.get("refused") is not None:
            continue  # refused at the site: the server got the error reply, nothing else
        if _digest(e) != _digest(se):
            rep.mismatch.append(
                f"{server.path}:{no} vs {path}:{sno}: {e['message_type']} ({e.get('group_id')}) "
                "differs between server and site (records or array hashes)"
            )
        rep.checked["matched messages"] += 1
    server_runs = {e.get("run_id") for _, e in server.entries}
    for items in site_side.values():
        for path, sno, se in items:
            if (
                id(se) in used
                or se.get("site") not in seen_sites
                or se.get("run_id") not in server_runs
            ):
                continue
            if se["direction"] == "out" and se.get("records"):
                rep.mismatch.append(
                    f"{path}:{sno}: the site sent {se['message_type']} ({se.get('group_id')}) "
                    "that the server's ledger does not show it received"
                )


def audit_run(run_dir: Path | None = None, site_dirs: Iterable[Path] = ()) -> AuditReport:
    """Audit a run folder (server ledger + ``sites/*/ledger.jsonl``) and/or site folders."""
    rep = AuditReport()
    server: LedgerFile | None = None
    site_paths: list[Path] = []
    expect: set[str] = set()
    if run_dir is not None:
        run_dir = Path(run_dir)
        if (run_dir / LEDGER_NAME).is_file():
            server = read_ledger(run_dir / LEDGER_NAME)
        else:
            rep.notes.append(f"{run_dir}: no server ledger ({LEDGER_NAME})")
        for d in sorted((run_dir / "sites").glob("*")) if (run_dir / "sites").is_dir() else []:
            found = _find_site_ledgers(d)
            site_paths += found
            if d.is_dir():
                expect.add(d.name)
    for d in site_dirs:
        found = _find_site_ledgers(d)
        if not found:
            rep.notes.append(f"{d}: no {LEDGER_NAME} here")
        site_paths += found
    sites = [read_ledger(pth) for pth in dict.fromkeys(site_paths)]
    rep.ledgers = ([server] if server else []) + sites
    for lf in rep.ledgers:
        if lf.chain_error:
            rep.chain.append(lf.chain_error)
        _check_ledger(lf, rep)
    if server is not None:
        if not sites:
            rep.notes.append(
                "no site ledgers given: server-side checks only (add --site DIR to cross-check)"
            )
        _cross_check(server, sites, rep, expect)
        for _, e in server.entries:
            if e.get("event") == "run" and e.get("fab_hash"):
                rep.notes.append(f"run {e.get('run_id')}: FAB hash {e['fab_hash']}")
    return rep
