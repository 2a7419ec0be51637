"""A phase's weights written from their arrays' .npy bytes read back exactly with safetensors."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

from common.fl.weights_file import write_safetensors


def test_an_array_record_written_straight_from_its_bytes_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    record = ArrayRecord({k: v.clone() for k, v in state.items()})
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    record["fortran"] = Array(fortran)  # not C order: the one case that is converted
    write_safetensors(tmp_path / "w.safetensors", record)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == {*state, "fortran"}
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert torch.equal(back["fortran"], torch.from_numpy(np.ascontiguousarray(fortran)))
