"""`crossprobe bench --suite gpu` is ready before a GPU is at hand: every item runs on a CPU with
the tiny config, a budget too small skips items and says so, the 2-rank check runs on gloo, and a
GPU asked for and not there is a clear error. Speeds are measured, never asserted."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common import distributed
from crossprobe.cli import app
from simulations.bench_gpu import STAGES, _two_rank_check, largest_batch, run_gpu_suite


def test_largest_batch_doubles_until_a_batch_does_not_fit():
    assert largest_batch(lambda n: n <= 300, 64, 4096) == 256
    assert largest_batch(lambda n: True, 64, 500) == 256  # stops at the limit
    assert largest_batch(lambda n: False, 64, 4096) is None


def test_the_gpu_suite_runs_every_item_on_a_cpu_and_keeps_its_json_up_to_date(tmp_path):
    out = tmp_path / "gpu.json"
    said = []
    # torch.compile of one stage (each takes about a minute on these CPUs; a GPU run does all)
    res = run_gpu_suite("configs/tiny.yaml", "cpu", out, budget_s=600, iters=1, warmup=0,
                        compile_stages=("finetune",), log=said.append)  # fmt: skip
    assert json.loads(out.read_text()) == res
    for stage in STAGES:
        assert res[f"{stage}_eager_img_per_s"] > 0, stage
        assert res[f"{stage}_eager_batch"] == res["per_device_batch"][stage]
    assert res["finetune_compiled_img_per_s"] > 0 and res["finetune_compiled_compile_s"] > 0
    for n in (1, 64):
        assert res[f"b{n}_fused_frames_per_s"] > 0 and res[f"b{n}_fused_over_single_time"] > 0
    assert res["contrastive_largest_batch"] == res["contrastive_largest_batch_searched_to"]
    assert "needs 2" in res["nccl_skipped"] and res["seconds"] < 600
    assert not any(k.endswith("_error") for k in res), res
    assert any(line.startswith("[bench gpu] finetune_compiled:") for line in said)  # progress


def test_a_budget_too_small_skips_items_and_says_why(tmp_path):
    res = run_gpu_suite("configs/tiny.yaml", "cpu", tmp_path / "gpu.json", budget_s=0,
                        log=lambda s: None)  # fmt: skip
    assert res["simmim_eager_skipped"].startswith("budget:")
    assert not any(k.endswith("_img_per_s") for k in res)


def test_the_two_rank_check_runs_on_gloo(tmp_path):
    res = distributed.spawn(_two_rank_check, (100_000,), world_size=2, device="cpu",
                            workdir=tmp_path, what="check")  # fmt: skip
    assert res["nccl_mtnxent_abs_diff"] < 1e-12
    assert res["nccl_allreduce_gb_per_s"] > 0


def test_the_suite_asked_for_a_gpu_that_is_not_there_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    res = CliRunner().invoke(app, ["bench", "--suite", "gpu", "--out", str(tmp_path / "g.json")])
    # (the suite's device is cuda unless told otherwise)
    assert res.exit_code == 2 and "no CUDA device is visible" in res.output, res.output
    res = CliRunner().invoke(app, ["bench", "--suite", "tpu"])
    assert res.exit_code == 2 and "unknown suite 'tpu'" in res.output, res.output
