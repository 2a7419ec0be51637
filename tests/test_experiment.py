"""`crossprobe experiment`: seeds through the federated workflow, then the study tables."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from clients.app import app as client_app
from common.config import ConfigError, load_experiment
from common.signals import Stopped
from server.app import app as server_app
from simulations.experiment import resolve, run_experiment, seed_config
from tests.fl_harness import run_server, site_grid


def in_process_runner(calls: list):
    """Runs one seed exactly as `crossprobe simulate` does, over the in-process grid (no Ray)."""

    def run(config, run_dir, fresh, cpus, timeout, sites_root):
        from simulations.sites import ensure_site

        cfg = load_experiment(config)
        for site in cfg.sites:
            ensure_site(site, cfg.model.img_size, sites_root, progress=False)
        run_server(server_app, site_grid(client_app, config, run_dir, sites_root, len(cfg.sites)))
        calls.append((cfg.seed, [v.name for v in cfg.study.variants]))

    return run


def test_smoke_study_runs_every_seed_and_writes_the_tables(tmp_path, flower_identity):
    calls: list = []
    out = run_experiment(
        "smoke", run_root=tmp_path, runner=in_process_runner(calls), log=lambda s: None
    )
    # seed 0 ran the variants, seed 1 only the every-seed baseline
    assert calls == [(0, ["lower-aug", "tau0.1", "simmim-b"]), (1, ["lower-aug"])]
    study = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    target = study["sites"]["telemed"]
    rows = target["rows"]
    assert rows["fusion-entropy"]["seeds"] == 2 and rows["lower-aug"]["seeds"] == 2
    assert rows["tau0.1"]["seeds"] == 1 and rows["fusion-entropy[simmim+simmim-b]"]["seeds"] == 1
    assert target["noise_floor"] is not None and target["gap"] is not None
    for m in ("simmim", "lower", "upper"):
        assert {"p_image_dice", "p_video_dice", "verdict"} <= set(rows[m])
    assert study["fusion_selection"]["selected"] in ("entropy", "margin", "mean")
    assert [t["setting"] for t in target["ablations"]] == [
        "finetune.augment",
        "contrastive.temperature",
    ]
    # a one-seed variant is compared with its base arm on that same seed, not on the 2-seed mean
    tau = next(r for t in target["ablations"] for r in t["rows"] if r["arm"] == "tau0.1")
    base0 = rows["mtnxent"]["dice_per_seed"][0]
    assert tau["delta_vs_base"] == pytest.approx(rows["tau0.1"]["dice"] - base0)
    ours0 = rows["fusion-entropy"]["dice_per_seed"][0]
    assert rows["tau0.1"]["delta_dice"] == pytest.approx(ours0 - rows["tau0.1"]["dice"])
    kinds = {r["pair"]: r["kind"] for r in target["pairs"]}
    assert kinds == {
        "simmim + mtnxent": "heterogeneous",
        "simmim + simmim-b": "homogeneous",
        "simmim + tau0.1": "heterogeneous",
    }
    assert "Noise floor" in md and "Table 7" in md and "Table 8" in md
    assert (out / "figures" / "dice_by_method.png").stat().st_size > 0
    assert (out / "figures" / "per_video.png").stat().st_size > 0
    # the seeds share one copy of the site data
    assert (out / "data" / "telemed").is_dir() and not (out / "seed-0" / "data").exists()

    # a second call reuses finished seeds and only rebuilds the tables
    again: list = []
    run_experiment("smoke", run_root=tmp_path, runner=in_process_runner(again), log=lambda s: None)
    assert again == []


def test_fine_tuning_repeats_reuse_the_pretraining_and_score_each_seed_as_their_mean(
    tmp_path, flower_identity
):
    """study.finetune_repeats: 2 — repeat 1 of each seed starts from that seed's pretrained
    encoders, fine-tunes other weights, and the study scores the mean of the two runs."""
    cfg = tmp_path / "repeats.yaml"
    smoke = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "smoke.yaml"
    cfg.write_text(
        f"base: {smoke}\nname: repeats\n"
        "study: {seeds: [3], finetune_repeats: 2, variants: [], pairs: []}\n"
    )
    calls: list = []
    out = run_experiment(cfg, run_root=tmp_path, runner=in_process_runner(calls), log=lambda s: 0)
    assert [c[0] for c in calls] == [3, 3]
    for seed in (3,):
        first, second = (
            json.loads((out / d / "results.json").read_text())
            for d in (f"seed-{seed}", f"seed-{seed}-repeat-1")
        )
        resumed = {p["phase"]: p["resumed"] for p in second["phases"]}
        assert resumed["pretrain"] and not resumed["finetune"]  # pretrained once per seed
        a, b = (r["evaluation"]["telemed"]["per_image"]["lower/dice"] for r in (first, second))
        assert a != b  # another fine-tuning run, not a copy
        study = json.loads((out / "study.json").read_text())
        lower = study["sites"]["telemed"]["rows"]["lower"]["dice_per_seed"][0]
        assert lower == pytest.approx((sum(a) / len(a) + sum(b) / len(b)) / 2)
    assert "fine-tuned every arm 2 times" in (out / "study.md").read_text()
    again: list = []
    run_experiment(cfg, run_root=tmp_path, runner=in_process_runner(again), log=lambda s: 0)
    assert again == []


def test_a_seed_stopped_and_resumed_reports_the_wall_time_of_every_invocation(
    tmp_path, flower_identity
):
    """SIGTERM mid-seed, then a rerun that finishes it: the seed's wall in study.json counts the
    stopped invocation too, not only the one that finished."""
    smoke = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "smoke.yaml"
    cfg = tmp_path / "resumed.yaml"
    one_seed = "study: {seeds: [0], variants: [], pairs: []}"
    cfg.write_text(f"base: {smoke}\nname: resumed\n{one_seed}\n")

    def stopped_after_a_while(*args):
        time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)  # what an operator's `kill` does to the command
        time.sleep(5.0)  # not reached: the signal raises

    with pytest.raises(Stopped):
        run_experiment(cfg, run_root=tmp_path, runner=stopped_after_a_while, log=lambda s: 0)
    lines: list[str] = []
    t0 = time.monotonic()
    out = run_experiment(cfg, run_root=tmp_path, runner=in_process_runner([]), log=lines.append)
    finishing = time.monotonic() - t0
    wall = json.loads((out / "seed-0" / "wall.json").read_text())
    assert wall["invocations"] == 2
    seconds = json.loads((out / "study.json").read_text())["wall_seconds"][0]
    assert 2.0 < seconds < 2.0 + finishing + 1.0
    assert seconds - 2.0 > 0.2 * finishing  # the finishing run counts as well
    assert f"seed 0 finished, {seconds / 60:.1f} min of wall" in "\n".join(lines)


def test_seeds_run_on_separate_machines_merge_into_one_study(tmp_path, flower_identity):
    """A study too long for one machine: each machine runs `--seeds S` into its own run root, the
    seed folders are copied into one, and `--report-only` writes the tables of all seeds from
    their results alone (no site data, no weights travel)."""
    smoke = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "smoke.yaml"
    cfg = tmp_path / "sharded.yaml"
    cfg.write_text(f"base: {smoke}\nname: sharded\nstudy: {{variants: [], pairs: []}}\n")
    shards = {}
    for seed in (0, 1):
        root = tmp_path / f"machine-{seed}"
        run_experiment(cfg, [seed], run_root=root, runner=in_process_runner([]), log=lambda s: 0)
        shards[seed] = json.loads((root / "sharded" / "study.json").read_text())
        merged = tmp_path / "merged" / "sharded" / f"seed-{seed}"
        merged.mkdir(parents=True)
        for name in ("results.json", "experiment.yaml", "wall.json"):
            (merged / name).write_bytes((root / "sharded" / f"seed-{seed}" / name).read_bytes())

    out = run_experiment(cfg, run_root=tmp_path / "merged", report_only=True, log=lambda s: 0)
    study = json.loads((out / "study.json").read_text())
    assert study["seeds"] == [0, 1]
    assert study["wall_seconds"] == [shards[0]["wall_seconds"][0], shards[1]["wall_seconds"][0]]
    rows = study["sites"]["telemed"]["rows"]
    for arm in ("lower", "upper", "simmim", "fusion-entropy"):
        by_shard = [shards[s]["sites"]["telemed"]["rows"][arm]["dice_per_seed"][0] for s in (0, 1)]
        assert rows[arm]["dice_per_seed"] == pytest.approx(by_shard)
    assert study["sites"]["telemed"]["noise_floor"] is not None  # two seeds: a spread to report


def test_unknown_experiment_names_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*smoke.*tables"):
        resolve("nope")


def test_seed_config_keeps_every_seed_variants_only_off_the_variant_seeds():
    cfg = load_experiment("configs/experiments/tables.yaml")
    assert len(seed_config(cfg, 0).study.variants) == len(cfg.study.variants)
    one = seed_config(cfg, 1)
    assert one.seed == 1 and [v.name for v in one.study.variants] == ["lower-aug"]
    assert one.study.pairs == ()


def test_report_only_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed 0 has not been run"):
        run_experiment("smoke", run_root=tmp_path, report_only=True, log=lambda s: None)


def test_experiment_configs_are_the_known_ones_and_load():
    paths = sorted(Path("configs/experiments").glob("*.yaml"))
    assert {p.stem for p in paths} == {"smoke", "tables", "adapt", "adapt-tent", "fair"}
    loaded = {path.stem: load_experiment(path) for path in paths}
    # The TENT study reuses the self-training study's folder: same name, only the method differs.
    assert loaded["adapt"].name == loaded["adapt-tent"].name == "adapt"
    assert loaded["adapt"].adapt.method == "self-training"
    assert loaded["adapt-tent"].adapt.method == "tent"
    assert loaded["adapt-tent"].adapt.optim == loaded["adapt"].adapt.optim
    assert loaded["tables"].adapt.method == "none"


def test_the_fair_study_pretrains_each_branch_50_epochs_on_the_tables_sites():
    from simulations.sites import plan_site

    fair = load_experiment("configs/experiments/fair.yaml")
    tables = load_experiment("configs/experiments/tables.yaml")
    target = next(s for s in fair.sites if s.role == "target")
    videos = [j for j in plan_site(target, fair.model.img_size) if j.split == "train"]
    train_frames = len(videos) * target.synth.frames_per_video
    for optim in (fair.simmim.optim, fair.contrastive.optim):
        assert optim.max_steps * optim.batch_size / train_frames >= 50
    # the benchmark is the tables' one: same sites and model; only the budget and recipe differ
    assert fair.sites == tables.sites and fair.model == tables.model
    assert fair.finetune.optim.ema_decay > 0
    assert fair.study.finetune_repeats >= 8  # measured floor 0.017 at 8 (0.045 at 1)
    assert fair.contrastive.optim.lr < tables.contrastive.optim.lr  # no collapse (ssl health)
    assert {v.name for v in fair.study.variants} >= {"gap10", "gap20", "gap30"}
    assert len(fair.study.variant_seeds) >= 2  # Table 6 on two seeds or more
