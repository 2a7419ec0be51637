"""A message's records as plain JSON: what the ledgers record and what the contract check reads.

For each array: its name, shape, dtype, payload bytes and the SHA-256 of the bytes that cross
(hashed once, from the ``Array.data`` buffer itself), plus a ``payload`` note when the ``.npy``
bytes are not exactly the declared array and a ``nonfinite`` count when a float array holds NaN
or ±inf. For config records: keys and values. For metric records: names, scalar values and, for
lists, their length, range and SHA-256 (never the values: those stay in the run's results).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


def _json_scalar(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan", "inf": JSON has no non-finite numbers
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    return v


def npy_header(data: bytes) -> tuple[tuple[int, ...], str, bool, int]:
    """(shape, dtype, Fortran order, header length) of an ``.npy`` payload, without copying it."""
    fp = io.BytesIO(data)  # shares the bytes buffer (no copy until written)
    version = np.lib.format.read_magic(fp)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(fp)
    return tuple(int(x) for x in shape), str(dtype), bool(fortran), fp.tell()


def _payload_problem(arr: Array, shape: list[int], dtype: str) -> tuple[str, int]:
    """(what is wrong with the ``.npy`` payload, or "", header length)."""
    if arr.stype != "numpy.ndarray":
        return f"stype {arr.stype!r} is not numpy.ndarray", 0
    try:
        got_shape, got_dtype, _, header = npy_header(arr.data)
    except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is not a parameter
        return f"not an .npy array ({type(err).__name__}: {err})", 0
    if list(got_shape) != shape or got_dtype != dtype:
        return f"payload is {list(got_shape)} {got_dtype}, declared {shape} {dtype}", header
    need = int(np.prod(got_shape, dtype=np.int64)) * np.dtype(got_dtype).itemsize
    if len(arr.data) - header != need:
        return (
            f"payload has {len(arr.data) - header} bytes, "
            f"{list(got_shape)} {got_dtype} needs fewer",
            header,
        )
    return "", header


def _count_nonfinite(data: bytes, dtype: str, header: int, chunk: int = 1 << 20) -> int:
    """NaN and ±inf in a float payload, read in place a chunk at a time (no full-size copy)."""
    if np.dtype(dtype).kind != "f":
        return 0
    view = np.frombuffer(data, dtype=np.dtype(dtype), offset=header)
    return sum(int((~np.isfinite(view[i : i + chunk])).sum()) for i in range(0, view.size, chunk))


def describe_array(name: str, arr: Array) -> dict:
    """One array as the ledger records it. ``bytes`` is the payload size after the .npy header,
    ``sha256`` covers ``Array.data`` exactly as it crosses (header included), hashed in place."""
    out: dict[str, Any] = {
        "name": name,
        "shape": [int(x) for x in arr.shape],
        "dtype": str(arr.dtype),
    }
    problem, header = _payload_problem(arr, out["shape"], out["dtype"])
    if problem:
        out["payload"] = problem
    elif nonfinite := _count_nonfinite(arr.data, out["dtype"], header):
        out["nonfinite"] = nonfinite
    out["bytes"] = len(arr.data) - header
    out["sha256"] = hashlib.sha256(arr.data).hexdigest()
    return out


def _describe_list(v: list) -> dict:
    """A number list by its length, range and the SHA-256 of its float64 values (the values
    themselves stay in the run's results; the hash lets both ends and the signature cover them)."""
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return {"len": len(v), "type": "list of non-numbers"}
    try:
        values = np.asarray(v, dtype=np.float64)
    except OverflowError:
        return {"len": len(v), "type": "list of out-of-range numbers"}
    out: dict[str, Any] = {"len": len(v), "sha256": hashlib.sha256(values.tobytes()).hexdigest()}
    if len(v):
        out["min"] = _json_scalar(float(values.min()))
        out["max"] = _json_scalar(float(values.max()))
    return out


def _describe_metric(v: Any) -> Any:
    if isinstance(v, list):
        return _describe_list(v)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return _json_scalar(v)
    return {"type": type(v).__name__}


def describe_record(name: str, record: Any) -> dict:
    if isinstance(record, ArrayRecord):
        arrays = [describe_array(k, a) for k, a in record.items()]
        return {"name": name, "type": "ArrayRecord", "arrays": arrays}
    if isinstance(record, MetricRecord):
        metrics = {k: _describe_metric(v) for k, v in record.items()}
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
    """Payload bytes of every array in a described message."""
    return sum(a["bytes"] for r in records for a in r.get("arrays", ()))
