"""`crossprobe simulate` end to end with Flower's real simulation runtime (SuperLink + Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.simulate import run_simulation, started_processes


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted `crossprobe simulate` of configs/tiny.yaml: (run folder, summary, what
    was left running, the user's FLWR_HOME that must stay untouched)."""
    tmp = tmp_path_factory.mktemp("tiny")
    user_home = tmp / "user-flwr-home-untouched"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", str(user_home))  # simulate uses <run-dir>/.flwr instead
        run_dir = tmp / "run"
        try:
            summary = run_simulation(Path("configs/tiny.yaml"), run_dir, timeout=540)
        finally:
            leftover = started_processes(run_dir / ".flwr")
    return run_dir, summary, leftover, user_home


@pytest.mark.slow
def test_flwr_run_simulation_on_tiny_completes_and_cleans_up(tiny_run):
    run_dir, summary, leftover, user_home = tiny_run
    assert summary["status"] == "finished:completed"
    assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()
    assert json.loads((run_dir / "simulate.json").read_text())["status"] == "finished:completed"
    assert [c["phase"] for c in summary["phases"]] == ["pretrain", "finetune", "evaluate"]
    assert leftover == [], f"Flower/Ray processes left running: {leftover}"
    assert not user_home.exists()
    # the server and both sites (Ray workers) kept ledgers that audit clean and agree
    from common.fl.audit import audit_run

    audit = audit_run(run_dir)
    assert audit.ok, audit.render()
    # 11 requests and their replies: 2 query, 2 pretrain, 4 finetune,
    # 3 evaluate (2 test + source val)
    assert len(audit.ledgers) == 3 and audit.checked["matched messages"] == 22
    assert audit.checked["signatures"] == 11  # every reply signed by its simulated site's key
    runs = [e for _, e in audit.ledgers[0].entries if e.get("event") == "run"]
    assert runs and runs[0]["run_id"] == summary["run_id"]


@pytest.mark.slow
def test_encoder_drift_compares_each_pretrained_encoder_with_its_fine_tuned_one(tiny_run):
    from typer.testing import CliRunner

    from crossprobe.cli import app

    run_dir = tiny_run[0]
    result = CliRunner().invoke(app, ["encoder-drift", str(run_dir), "--frames", "16"])
    assert result.exit_code == 0, result.output
    drift = json.loads((run_dir / "encoder_drift.json").read_text())
    assert drift["site"] == "telemed" and set(drift["arms"]) == {"simmim", "mtnxent"}
    for arm in drift["arms"].values():
        assert 0 < arm["cka_finetuned"] <= 1 + 1e-9 and 0 < arm["cka_untrained"] <= 1 + 1e-9
    assert (run_dir / "encoder_drift.png").stat().st_size > 5000
    missing = CliRunner().invoke(app, ["encoder-drift", str(run_dir / "phases")])
    assert missing.exit_code != 0 and "config.yaml" in missing.output


@pytest.mark.slow
def test_experiment_cli_runs_a_seed_with_variants_through_flower(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from common.fl.audit import audit_run
    from crossprobe.cli import app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "user-flwr-home-untouched"))
    # seed 0 is the seed the variants run on
    res = CliRunner().invoke(
        app,
        ["experiment", "smoke", "--seeds", "0", "--run-root", str(tmp_path), "--timeout", "540"],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "smoke"
    assert started_processes(out / "seed-0" / ".flwr") == []
    study = json.loads((out / "study.json").read_text())
    rows = study["sites"]["telemed"]["rows"]
    assert {"tau0.1", "simmim-b", "lower-aug", "fusion-entropy[simmim+simmim-b]"} <= set(rows)
    assert "no difference is called" in (out / "study.md").read_text()  # one seed: no verdicts
    # the variant arms crossed under the same contract: the audit of that run is clean
    audit = audit_run(out / "seed-0")
    assert audit.ok, audit.render()


@pytest.mark.slow
def test_sigterm_mid_phase_stops_everything_and_the_run_resumes_to_the_same_tables(
    tiny_run, tmp_path
):
    from common.fl.audit import audit_run

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "crossprobe",
        "simulate",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        "--timeout",
        "540",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "finetune round 1/1" in line:  # pretrain completed, finetune messages sent
            break
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"in use by PID {proc.pid}" in second.stderr
    os.kill(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    assert started_processes(run_dir / ".flwr") == []
    phases = json.loads((run_dir / "phases.json").read_text())["completed"]
    assert [c["phase"] for c in phases] == ["pretrain"]

    summary = run_simulation(Path("configs/tiny.yaml"), run_dir, timeout=540)
    assert summary["status"] == "finished:completed"
    assert started_processes(run_dir / ".flwr") == []
    resumed = json.loads((run_dir / "results.json").read_text())
    uninterrupted = json.loads((tiny_run[0] / "results.json").read_text())
    assert resumed["tables"] == uninterrupted["tables"]
    assert [ph["phase"] for ph in resumed["phases"] if ph["resumed"]] == ["pretrain"]
    audit = audit_run(run_dir)
    assert audit.ok, audit.render()


def test_fresh_empties_a_run_folder_but_never_a_foreign_one(tmp_path):
    import typer

    from simulations.simulate import _empty_run_folder

    run = tmp_path / "run"
    (run / "phases").mkdir(parents=True)
    (run / "phases.json").write_text("{}")
    (run / ".lock").write_text("")
    _empty_run_folder(run)
    assert [p.name for p in run.iterdir()] == [".lock"]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(typer.BadParameter, match="not a crossprobe run folder"):
        _empty_run_folder(foreign)
    assert (foreign / "thesis.tex").exists()
