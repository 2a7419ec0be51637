"""An ArrayRecord written as a safetensors file straight from its arrays' ``.npy`` payloads.

A phase's weights arrive as bytes (each Array holds an ``.npy`` file); turning them into tensors
only to write them out again would hold every model twice more at the server (tensors, then
safetensors' own buffer). The safetensors format is an 8-byte little-endian header size, a JSON
header (dtype, shape, byte range of each tensor) and the raw little-endian C-order bytes; an
``.npy`` payload is a header and exactly those bytes, so they are written as they are.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array

from common.fl.describe import npy_header

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def _payload(arr: Array) -> tuple[memoryview, str, tuple[int, ...]]:
    """(raw C-order little-endian bytes, safetensors dtype, shape) of one array."""
    shape, dtype, fortran, header = npy_header(arr.data)
    np_dtype = np.dtype(dtype)
    if fortran or np_dtype.byteorder == ">" or dtype not in SAFETENSORS_DTYPES:
        # not as safetensors stores it: the one copy this path otherwise avoids
        a = np.ascontiguousarray(arr.numpy()).astype(np_dtype.newbyteorder("<"), copy=False)
        if a.dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(f"dtype {a.dtype} cannot be stored as safetensors")
        return memoryview(a.tobytes()), SAFETENSORS_DTYPES[a.dtype.name], a.shape
    return memoryview(arr.data)[header:], SAFETENSORS_DTYPES[np_dtype.name], shape


def write_safetensors(path: Path, arrays: Mapping[str, Array]) -> None:
    """Write ``arrays`` (an ArrayRecord) to ``path`` as safetensors, without converting them."""
    payloads = {k: _payload(a) for k, a in arrays.items()}
    header, offset = {}, 0
    for k, (data, dtype, shape) in payloads.items():
        header[k] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data, _, _ in payloads.values():
            f.write(data)
