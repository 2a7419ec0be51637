"""`crossprobe simulate` end to end with Flower's real simulation runtime (SuperLink + Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.simulate import run_simulation, started_processes


@pytest.mark.slow
def test_flwr_run_simulation_on_tiny_completes_and_cleans_up(tmp_path, monkeypatch):
    # a run-local FLWR_HOME (simulate uses <run-dir>/.flwr) and a tmp run folder
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "user-flwr-home-untouched"))
    run_dir = tmp_path / "run"
    try:
        summary = run_simulation(Path("configs/tiny.yaml"), run_dir, timeout=540)
    finally:
        leftover = started_processes(run_dir / ".flwr")
    assert summary["status"] == "finished:completed"
    assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()
    assert json.loads((run_dir / "simulate.json").read_text())["status"] == "finished:completed"
    assert [c["phase"] for c in summary["phases"]] == ["pretrain", "finetune", "evaluate"]
    assert leftover == [], f"Flower/Ray processes left running: {leftover}"
    assert not (tmp_path / "user-flwr-home-untouched").exists()
    # the server and both sites (Ray workers) kept ledgers that audit clean and agree
    from common.fl.audit import audit_run

    audit = audit_run(run_dir)
    assert audit.ok, audit.render()
    # 11 requests and their replies: 2 query, 2 pretrain, 4 finetune,
    # 3 evaluate (2 test + source val)
    assert len(audit.ledgers) == 3 and audit.checked["matched messages"] == 22
    runs = [e for _, e in audit.ledgers[0].entries if e.get("event") == "run"]
    assert runs and runs[0]["run_id"] == summary["run_id"]


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
