"""Pretraining's label-free signals (common/ssl_health.py): each against a slow reference written
from its definition; the collapse value is the loss the contrastive branches really give on
collapsed embeddings; a pretraining stage reports them through the contract, draws them, and the
report flags a branch that is not learning."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ssl_health
from common.config import load_experiment
from common.data.manifest import load_site
from common.fl.contract import TRAIN_METRIC_NAMES
from common.losses import MTNXentLoss, masked_l1
from server import report


def _views(b: int = 12, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_i = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z_i, z_i + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)


def _slow_signals(z_i, z_j) -> dict[str, float]:
    """The definitions, one number at a time (numpy, float64)."""
    unit = [v / np.linalg.norm(v) for v in np.concatenate([z_i.numpy(), z_j.numpy()])]
    n, d, b = len(unit), len(unit[0]), len(unit) // 2
    stds = []
    for k in range(d):
        col = [u[k] for u in unit]
        mean = sum(col) / n
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in col) / (n - 1)))
    centred = np.array(unit) - np.mean(unit, axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    p = s / s.sum()
    pairs = list(itertools.combinations(range(n), 2))
    potential = [math.exp(-2 * float(np.sum((unit[a] - unit[c]) ** 2))) for a, c in pairs]
    return {
        "ssl_std": sum(stds) / d * math.sqrt(d),
        "ssl_rank": math.exp(-sum(x * math.log(x) for x in p if x > 0)),
        "ssl_alignment": sum(float(np.sum((unit[i] - unit[i + b]) ** 2)) for i in range(b)) / b,
        "ssl_uniformity": math.log(sum(potential) / len(potential)),
    }


def test_contrastive_signals_equal_their_definitions():
    z_i, z_j = _views()
    loss = MTNXentLoss(0.5, 3)
    video, frame = torch.arange(12) // 4, torch.arange(12) % 4
    got = ssl_health.contrastive_signals(z_i, 5.0 * z_j, loss.denominator_terms(video, frame))
    want = _slow_signals(z_i, z_j)  # the scale of a projection does not matter
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("gap", [0, 3])
def test_the_collapse_value_is_the_loss_of_collapsed_embeddings(gap):
    loss = MTNXentLoss(0.5, gap)
    video, frame = torch.arange(12) // 4, torch.arange(12) % 4
    same = torch.ones(12, 6, dtype=torch.float64)
    got = ssl_health.contrastive_signals(same, same, loss.denominator_terms(video, frame))
    assert got["ssl_collapse_loss"] == pytest.approx(float(loss(same, same, video, frame)), 1e-12)
    if gap == 0:  # SimCLR's NT-Xent: ln(2B - 1)
        assert got["ssl_collapse_loss"] == pytest.approx(math.log(2 * 12 - 1), rel=1e-12)
    else:  # fewer negatives: a lower collapse value
        assert got["ssl_collapse_loss"] < math.log(2 * 12 - 1)
    assert got["ssl_std"] == 0 and got["ssl_rank"] == 0 and got["ssl_uniformity"] == 0


def test_spread_collapsed_and_one_direction_embeddings_read_as_such():
    terms = torch.full((256,), 255)
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(128, 16, generator=g, dtype=torch.float64)
    s = ssl_health.contrastive_signals(spread, torch.randn(128, 16, generator=g).double(), terms)
    assert 0.9 < s["ssl_std"] <= 1.05 and s["ssl_rank"] > 14
    line = torch.randn(128, 1, generator=g, dtype=torch.float64).sign() * torch.eye(16)[0]
    one = ssl_health.contrastive_signals(line.double(), line.double(), terms)
    assert one["ssl_rank"] == pytest.approx(1.0, abs=1e-6) and one["ssl_alignment"] == 0
    healthy = {**s, "ssl_loss_ratio": 0.8}
    assert ssl_health.verdict(healthy) == "learning"
    assert ssl_health.verdict({**healthy, **one}).startswith("collapsed (embeddings use one")
    assert ssl_health.verdict({**healthy, "ssl_std": 0.0}).startswith("collapsed (embeddings have")
    assert ssl_health.verdict({**healthy, "ssl_loss_ratio": 0.99}).startswith("not learning")
    assert ssl_health.verdict({"train_loss": 1.0}) == ""  # no signals (a fine-tuning stage)


def test_simmim_reference_is_the_masked_l1_of_predicting_each_images_mean():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=g)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.4).float()
    total, count = 0.0, 0
    for i, c, h, w in itertools.product(range(3), range(3), range(8), range(8)):
        if mask[i, 0, h, w]:
            total += abs(float(x[i, c, h, w]) - float(x[i, c].mean()))
            count += 1
    got = ssl_health.simmim_signals(x, mask)["ssl_mean_l1"]
    assert got == pytest.approx(total / count, rel=1e-5)
    assert float(masked_l1(x, x, mask)) == 0  # a perfect reconstruction: ratio 0, learning
    assert ssl_health.verdict({"ssl_mean_l1": got, "ssl_loss_ratio": 1.0}).startswith(
        "not learning (no better than predicting the mean)"
    )


def test_summary_is_the_last_steps_mean_and_the_loss_over_its_collapse_value():
    history = [{"step": s, "loss": 4.0 - 0.1 * s, "ssl_collapse_loss": 4.0, "ssl_std": 0.1 * s}
               for s in range(1, 21)]  # fmt: skip
    out = ssl_health.summary(history)
    last = history[-10:]
    assert out["ssl_std"] == pytest.approx(sum(h["ssl_std"] for h in last) / 10)
    assert out["ssl_loss_ratio"] == pytest.approx(sum(h["loss"] for h in last) / 10 / 4.0)
    assert ssl_health.summary([{"step": 1, "loss": 1.0}]) == {}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from simulations.demo_data import demo_data

    root = tmp_path_factory.mktemp("health")
    _, target = demo_data(Path("configs/tiny.yaml"), root / "data")
    return load_site(target)


@pytest.mark.parametrize("branch", ["simmim", "contrastive", "simclr"])
def test_a_pretraining_stage_reports_draws_and_may_send_its_signals(branch, target, tmp_path):
    from common.stages import pretrain

    cfg = load_experiment("configs/tiny.yaml")
    res = pretrain(cfg, branch, target, tmp_path, progress=False)
    signals = {k for k in res.metrics if k.startswith("ssl_")}
    want = ssl_health.SIMMIM_SIGNALS if branch == "simmim" else ssl_health.CONTRASTIVE_SIGNALS
    assert signals == {*want, ssl_health.LOSS_RATIO}
    assert set(res.metrics) <= TRAIN_METRIC_NAMES  # the guard lets them cross
    assert all(math.isfinite(res.metrics[k]) for k in signals)
    assert (tmp_path / "ssl_health.png").stat().st_size > 5000
    if branch == "simclr":  # its collapse value is ln(2B - 1) at the config's batch size
        assert res.metrics["ssl_collapse_loss"] == pytest.approx(math.log(2 * 8 - 1))


def test_the_report_flags_a_branch_that_is_not_learning():
    learning = {"steps": 100.0, "train_loss": 3.0, "ssl_collapse_loss": 4.1, "ssl_std": 0.8,
                "ssl_rank": 20.0, "ssl_alignment": 0.3, "ssl_uniformity": -3.0,
                "ssl_loss_ratio": 0.73}  # fmt: skip
    stuck = {**learning, "train_loss": 4.1, "ssl_loss_ratio": 1.0}
    stage_metrics = {"pretrain": {"mtnxent": {"round-1": {"telemed": learning}},
                                  "simclr": {"round-1": {"telemed": stuck}}}}  # fmt: skip
    rows = report.pretraining_health(stage_metrics)
    verdicts = [(r["arm"], r["verdict"]) for r in rows]
    assert verdicts == [
        ("mtnxent", "learning"),
        ("simclr", "not learning (loss at its collapse value)"),
    ]
    text = "\n".join(report._pretraining_section({"pretraining_health": rows}))
    assert "| mtnxent | telemed | 100 | 3.000 | 0.730 |" in text
    assert "**not learning (loss at its collapse value)**" in text
