"""`runtime.wire_dtype: float16`: float weights cross the network in half the bytes, both ways, and
the run still audits clean; a value float16 cannot hold is sent as float32, never as infinity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clients.app import app as client_app
from common.config import load_experiment
from common.fl import contract
from common.fl.audit import audit_run
from common.fl.messages import on_the_wire
from server.app import app as server_app
from tests.fl_harness import materialise, run_server, site_grid


def test_float_tensors_go_as_float16_unless_a_value_does_not_fit():
    assert on_the_wire(torch.ones(3), "float16").dtype == torch.float16
    assert on_the_wire(torch.ones(3), "float32").dtype == torch.float32
    assert on_the_wire(torch.tensor([3], dtype=torch.int64), "float16").dtype == torch.int64
    big = torch.tensor([1.0, 7e4])  # float16 tops out at 65504
    assert on_the_wire(big, "float16").dtype == torch.float32
    torch.testing.assert_close(on_the_wire(torch.tensor([0.1]), "float16").float(),
                               torch.tensor([0.1]), atol=1e-4, rtol=0)  # fmt: skip


def _run(tmp_path, wire_dtype: str):
    cfg = load_experiment("configs/tiny.yaml", overrides={"runtime.wire_dtype": wire_dtype})
    exp, sites_root = materialise(cfg, tmp_path, wire_dtype)
    run = tmp_path / wire_dtype
    grid = site_grid(client_app, exp, run, sites_root)
    run_server(server_app, grid)
    weights = (contract.TRAIN_PRETRAIN, contract.TRAIN_FINETUNE)
    received = sum(s.bytes_in for s in grid.log if s.message_type in weights)
    sent = sum(s.bytes_out for s in grid.log if s.message_type != contract.QUERY_SITE)
    return run, received, sent


@pytest.mark.slow
def test_a_float16_wire_halves_the_bytes_both_ways_and_audits_clean(tmp_path, flower_identity):
    run32, received32, sent32 = _run(tmp_path, "float32")
    run16, received16, sent16 = _run(tmp_path, "float16")
    assert 0.49 < received16 / received32 < 0.55, (received16, received32)
    assert 0.49 < sent16 / sent32 < 0.60, (sent16, sent32)  # requests carry configs too
    stored = load_file(str(next((run16 / "phases" / "finetune").glob("*.safetensors"))))
    assert {t.dtype for t in stored.values()} <= {torch.float16, torch.int64}
    report = audit_run(run16)
    assert report.ok, report.render()
    dice = [
        json.loads((r / "results.json").read_text())["tables"]["telemed"] for r in (run32, run16)
    ]
    for method in dice[0]:
        assert dice[1][method]["dice"] == pytest.approx(dice[0][method]["dice"], abs=0.05), method
