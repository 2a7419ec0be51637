"""The adapt phase (common/adapt.py): its losses against slow references written from their
definitions, what each method may change, that no label is read, and the phase through the real
ServerApp and ClientApp — the adapted pair scored at the target as ``ours+adapt``, kept there, and
nothing but scalars coming back."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from clients.app import app as client_app
from common import arms
from common.adapt import NORMS, MeanTeacherPair, adapt, health, tent_parameters
from common.bundle import load_bundle
from common.config import SiteConfig, SynthConfig, load_experiment
from common.data.manifest import load_site
from common.fl import contract, messages
from common.fl.audit import audit_run
from common.fl.describe import describe
from common.losses import DiceBCELoss, binary_entropy, weighted_dice_bce
from common.models import build_transunet
from common.stages import finetune
from crossprobe.cli import app as crossprobe_cli
from server.app import app as server_app
from tests.fl_harness import materialise, run_server, site_grid

STEPS = {f"{s}.optim.max_steps": 2 for s in ("simmim", "contrastive", "finetune", "adapt")}


def _slow_weighted_dice_bce(logits, target, weight, smooth=1.0) -> float:
    """Pixel by pixel, from the definition: BCE = Σ w·bce / Σ w; Dice over the whole batch."""
    num = den_p = den_g = bce = wsum = 0.0
    for z, g, w in zip(logits.flatten().tolist(), target.flatten().tolist(),
                       weight.flatten().tolist(), strict=True):  # fmt: skip
        p = 1 / (1 + math.exp(-z))
        num += w * p * g
        den_p += w * p
        den_g += w * g
        bce += w * -(g * math.log(p) + (1 - g) * math.log(1 - p))
        wsum += w
    return 1 - (2 * num + smooth) / (den_p + den_g + smooth) + bce / wsum


def test_weighted_dice_bce_matches_its_definition_and_is_dicebce_at_unit_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(2, 1, 5, 4, generator=g) > 0.6).double()
    weight = torch.rand(2, 1, 5, 4, generator=g, dtype=torch.float64)
    got = float(weighted_dice_bce(logits, target, weight))
    assert got == pytest.approx(_slow_weighted_dice_bce(logits, target, weight), rel=1e-5)
    ones = torch.ones_like(weight)
    assert float(weighted_dice_bce(logits, target, ones)) == pytest.approx(
        float(DiceBCELoss()(logits, target)), rel=1e-6
    )
    with pytest.raises(ValueError, match="must match"):
        weighted_dice_bce(logits, target, weight[:1])


def test_binary_entropy_is_ln2_at_a_coin_flip_and_zero_at_certainty():
    h = binary_entropy(torch.tensor([0.5, 0.0, 1.0, 0.1]))
    assert float(h[0]) == pytest.approx(math.log(2))
    assert float(h[1]) < 1e-5 and float(h[2]) < 1e-5
    assert float(h[3]) == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), rel=1e-5)


def test_the_teacher_is_an_exponential_moving_average_and_stays_in_eval_mode():
    students = {"a": nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))}
    pair = MeanTeacherPair(students, momentum=0.9)
    before = pair.teacher["a"][0].weight.detach().clone()
    with torch.no_grad():
        pair.students["a"][0].weight.add_(1.0)
    pair.update_teacher()
    expected = 0.9 * before + 0.1 * pair.students["a"][0].weight.detach()
    assert torch.allclose(pair.teacher["a"][0].weight, expected)
    pair.train()
    assert pair.students["a"].training and not pair.teacher["a"].training
    assert not any(p.requires_grad for p in pair.teacher.parameters())


def test_tent_trains_only_the_normalisation_layers_affine_parameters():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1)
    )
    params = tent_parameters(net)
    assert {id(p) for p in params} == {id(p) for m in (net[1], net[2]) for p in (m.weight, m.bias)}
    assert not net[0].weight.requires_grad and not net[3].bias.requires_grad


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny experiment's two sites and a fine-tuned main pair (from scratch: seconds)."""
    from simulations.demo_data import demo_data

    root = tmp_path_factory.mktemp("adapt")
    cfg = load_experiment("configs/tiny.yaml", overrides=STEPS)
    source, target = demo_data(Path("configs/tiny.yaml"), root / "data")
    models = {
        arm: finetune(cfg, load_site(source), root / arm, None, arm, progress=False).state
        for arm in arms.MAIN_PAIR
    }
    return {"cfg": cfg, "target": target, "models": models, "root": root}


def _with(cfg, **adapt):
    return cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update=adapt)})


@pytest.mark.parametrize("method", ["self-training", "tent"])
def test_adapt_reads_no_label_and_changes_what_its_method_may_change(
    tiny, tmp_path, method, monkeypatch
):
    from common.data import datasets

    read_png = datasets.read_png

    def no_masks(path, mode="L"):  # every label read goes through here
        assert "masks" not in Path(path).parts, f"the adapt phase read a label: {path}"
        return read_png(path, mode)

    monkeypatch.setattr(datasets, "read_png", no_masks)
    data = tiny["target"]
    cfg = _with(tiny["cfg"], method=method)
    res = adapt(cfg, load_site(data), tmp_path / "out", tiny["models"], progress=False)
    assert set(res.states) == set(arms.ADAPTED_PAIR)
    assert res.metrics["steps"] == 2 and (tmp_path / "out" / "loss.png").is_file()
    for name in ("entropy", "agreement", "foreground"):
        for when in ("before", "after"):
            assert 0.0 <= res.metrics[f"{name}_{when}"] <= 1.0
    assert set(res.metrics) <= contract.ADAPT_METRIC_NAMES
    before, after = tiny["models"][arms.SIMMIM], res.states[arms.ADAPTED_PAIR[0]]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed
    if method == "tent":  # norm affine parameters and batch-norm statistics, nothing else
        net = build_transunet(cfg.model, num_classes=1)
        norms = {f"{name}." for name, m in net.named_modules() if isinstance(m, NORMS)}
        assert all(any(k.startswith(n) for n in norms) for k in changed), sorted(changed)[:5]
    else:
        assert any(k.endswith("conv.weight") or "attn" in k for k in changed)


def test_health_signals_are_read_from_predictions_alone(tiny):
    from common.stages import load_models

    cfg = tiny["cfg"]
    nets = load_models(cfg, tiny["models"], torch.device("cpu"))
    frames = torch.rand(3, 3, cfg.model.img_size, cfg.model.img_size)
    same = {arms.SIMMIM: nets[arms.SIMMIM], arms.MTNXENT: nets[arms.SIMMIM]}
    assert health(cfg, same, frames, "cpu")["agreement"] == pytest.approx(1.0)


def test_an_adapt_reply_carrying_weights_is_refused():
    bad = messages.pack_metrics_reply({"steps": 2.0}, 4)
    bad[contract.MODEL] = messages.pack_weights_reply(contract.MODEL, {"w": torch.zeros(2)}, {}, 1)[
        contract.MODEL
    ]
    with pytest.raises(contract.ContractViolation, match="'model' is not allowed"):
        contract.check("reply", contract.TRAIN_ADAPT, contract.TARGET, describe(bad), None,
                       request=[])  # fmt: skip
    with pytest.raises(contract.ContractViolation, match="source"):
        contract.check("request", contract.TRAIN_ADAPT, contract.SOURCE, [], None)


def test_the_adapt_phase_scores_ours_adapt_at_the_target_keeps_it_there_and_audits_clean(
    tmp_path, tiny, flower_identity
):
    # two targets: each adapts to its own frames
    second = SiteConfig(name="telemed2", role="target", synth=SynthConfig(
        preset="target", patients=6, videos_per_patient=1, frames_per_video=8, seed=3))  # fmt: skip
    cfg = _with(tiny["cfg"], method="self-training")
    cfg = cfg.model_copy(update={"sites": (*cfg.sites, second)})
    exp, sites_root = materialise(cfg, tmp_path, "adapt")
    run = tmp_path / "run"
    grid = site_grid(client_app, exp, run, sites_root, 3)
    run_server(server_app, grid)
    adapts = [s for s in grid.log if s.message_type == contract.TRAIN_ADAPT]
    assert len(adapts) == 2  # one per target
    for sent in adapts:  # no weights back
        assert set(sent.records_in) == {contract.METRICS, contract.SIGNATURE}
    results = json.loads((run / "results.json").read_text())
    ours_adapt = arms.ours_adapted(cfg.fusion.default_mode)
    assert results["methods"][:2] == [arms.ours(cfg.fusion.default_mode), ours_adapt]
    target, source = results["tables"]["telemed"], results["tables"]["lumify"]
    for m in (ours_adapt, *arms.ADAPTED_PAIR):
        assert 0.0 <= target[m]["dice"] <= 1.0 and "p_dice" in target[m], m
        assert m not in source  # the adapted pair never left the target
    assert results["gap_closed_adapted"]["telemed"]["dice"] is not None
    assert [p["phase"] for p in results["phases"]] == [
        "discover", "pretrain", "finetune", "adapt", "evaluate",
    ]  # fmt: skip
    report = (run / "report.md").read_text()
    assert "Ours+adapt (self-training at the target)" in report
    assert "by ours+adapt" in report and "Adaptation at the target" in report
    # the bundle segment uses is the adapted pair; the paper's pair is beside it
    site = run / "sites" / "telemed"
    bundle = load_bundle(site / "bundle")
    assert (
        bundle.pair == arms.ADAPTED_PAIR and bundle.card["adaptation"]["method"] == "self-training"
    )
    assert bundle.card["metrics"][f"{ours_adapt}/dice"] == pytest.approx(target[ours_adapt]["dice"])
    assert load_bundle(site / "bundle-unadapted").pair == arms.MAIN_PAIR
    sweep, seg = str(sites_root / "telemed"), str(tmp_path / "seg")
    res = CliRunner().invoke(crossprobe_cli, ["segment", str(site / "bundle"), sweep, "--out", seg])
    assert res.exit_code == 0 and ours_adapt in res.output, res.output
    assert any((tmp_path / "seg").rglob("frames.csv"))
    assert not (run / "sites" / "lumify" / "adapt").exists()
    own = {n: load_bundle(run / "sites" / n / "bundle").states for n in ("telemed", "telemed2")}
    a, b = (own[n][arms.ADAPTED_PAIR[0]] for n in own)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each adapted to its own frames
    report = audit_run(run)
    assert report.ok, report.render()
    # a lost adapted pair (the site's folder cleaned) is made again, the same, at evaluation
    first = target[ours_adapt]["dice"]
    shutil.rmtree(site / "adapt")
    index = json.loads((run / "phases.json").read_text())  # evaluation not done yet
    index["completed"] = [c for c in index["completed"] if c["phase"] != "evaluate"]
    (run / "phases.json").write_text(json.dumps(index))
    grid = site_grid(client_app, exp, run, sites_root, 3)
    run_server(server_app, grid)
    again = json.loads((run / "results.json").read_text())
    assert [p["phase"] for p in again["phases"] if p["resumed"]][:3] == [
        "pretrain", "finetune", "adapt",
    ]  # fmt: skip
    assert again["tables"]["telemed"][ours_adapt]["dice"] == pytest.approx(first)


def test_outside_frame_marks_the_padding_and_grows_only_where_there_is_padding():
    from common.data.transforms import outside_frame

    wide = outside_frame(80, 100, 96, margin=2)[0]  # padded at the bottom only
    assert wide[:74].sum() == 0 and wide[74:].eq(1).all()
    assert outside_frame(100, 100, 96, margin=2).sum() == 0  # square: nothing outside
    tall = outside_frame(100, 50, 96, margin=0)[0]
    assert tall[:, :48].sum() == 0 and tall[:, 48:].eq(1).all()
