"""The server's run folder: a fine-tuning repeat adopts another run's completed phase."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from server.store import RunDirError, RunStore


def _complete(store: RunStore, phase: str, inputs: str, value: float) -> None:
    weights = {"simmim": ArrayRecord({"w": torch.full((2,), value)})}
    store.save_phase(phase, weights, {"sites": {}}, {"seconds": 1.0, "inputs": inputs})


def test_adopt_copies_a_completed_phase_once_and_drops_what_followed_it(tmp_path):
    seed, repeat = RunStore(tmp_path / "seed", "exp"), RunStore(tmp_path / "repeat", "exp")
    _complete(seed, "pretrain", "in-1", 1.0)
    assert repeat.adopt(seed, "pretrain")
    assert repeat.load_weights("pretrain")["simmim"]["w"].tolist() == [1.0, 1.0]
    assert repeat.inputs_of("pretrain") == "in-1"
    _complete(repeat, "finetune", "ft", 2.0)
    assert not repeat.adopt(seed, "pretrain")  # same inputs: nothing to do, finetune kept
    assert RunStore(tmp_path / "repeat", "exp").completed() == ["pretrain", "finetune"]
    _complete(seed, "pretrain", "in-2", 3.0)  # the seed pretrained again on other inputs
    assert repeat.adopt(seed, "pretrain")
    assert repeat.completed() == ["pretrain"]  # its fine-tuning was on the old encoders
    assert repeat.load_weights("pretrain")["simmim"]["w"].tolist() == [3.0, 3.0]


def test_adopt_refuses_another_experiment_or_an_unfinished_phase(tmp_path):
    seed = RunStore(tmp_path / "seed", "exp")
    with pytest.raises(RunDirError, match="another experiment"):
        RunStore(tmp_path / "other", "other-exp").adopt(seed, "pretrain")
    with pytest.raises(RunDirError, match="has not completed phase 'pretrain'"):
        RunStore(tmp_path / "repeat", "exp").adopt(seed, "pretrain")
