"""A stage killed part-way goes on from its last whole epoch and ends exactly where it would have
ended uninterrupted: the same weights bit for bit, the same loss history (common/resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import common.engine
from common.config import load_experiment
from common.data.manifest import load_site
from common.resume import FILENAME
from common.stages import finetune, pretrain

EPOCHS = 4


class Killed(Exception):
    """What the test raises in place of a SIGKILL."""


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from simulations.demo_data import demo_data

    source, target = demo_data(Path("configs/tiny.yaml"), tmp_path_factory.mktemp("d") / "data")
    return load_site(source), load_site(target)


def _cfg(**finetune_optim):
    cfg = load_experiment("configs/tiny.yaml")
    budget = {"epochs": EPOCHS, "max_steps": None}
    return cfg.model_copy(
        update={
            "simmim": cfg.simmim.model_copy(
                update={"optim": cfg.simmim.optim.model_copy(update=budget)}
            ),
            "contrastive": cfg.contrastive.model_copy(
                update={"optim": cfg.contrastive.optim.model_copy(update=budget)}
            ),
            "finetune": cfg.finetune.model_copy(
                update={
                    "optim": cfg.finetune.optim.model_copy(
                        update={**budget, "ema_decay": 0.9, **finetune_optim}
                    )
                }
            ),
        }
    )


def _count_steps(monkeypatch) -> list[int]:
    """A counter of the optimiser steps the fit takes from now on."""
    real, calls = common.engine._optimizer_step, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(common.engine, "_optimizer_step", counted)
    return calls


def _kill_at_step(monkeypatch, step: int) -> None:
    """Make the fit die (as a killed process would) at optimiser step ``step``."""
    real, calls = common.engine._optimizer_step, [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Killed(f"killed at step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(common.engine, "_optimizer_step", dying)


def _run(stage: str, cfg, sites, out: Path):
    source, target = sites
    if stage == "finetune":
        return finetune(cfg, source, out, None, "lower", progress=True)
    return pretrain(cfg, stage, target, out, progress=True)


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["history"]


def _same(a, b) -> None:
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    timing = {"seconds", "images_per_s"}
    assert {k: v for k, v in a.metrics.items() if k not in timing} == {
        k: v for k, v in b.metrics.items() if k not in timing
    }


@pytest.mark.parametrize("stage", ["simmim", "contrastive", "finetune"])
def test_a_stage_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    stage, sites, tmp_path, monkeypatch, capsys
):
    cfg = _cfg()
    whole = _run(stage, cfg, sites, tmp_path / "whole")
    steps = int(whole.metrics["steps"])
    per_epoch = steps // EPOCHS
    assert per_epoch >= 2, "the test needs a kill strictly inside an epoch"

    stopped = tmp_path / "stopped"
    kill = 2 * per_epoch + 2  # in the third epoch: two whole epochs are saved
    _kill_at_step(monkeypatch, kill)
    with pytest.raises(Killed):
        _run(stage, cfg, sites, stopped)
    monkeypatch.undo()
    assert (stopped / FILENAME).is_file()
    capsys.readouterr()

    taken = _count_steps(monkeypatch)
    resumed = _run(stage, cfg, sites, stopped)
    assert taken == [steps - 2 * per_epoch]  # only what the two saved epochs had not done
    assert (
        f"resumed after epoch 2/{EPOCHS} (step {2 * per_epoch}/{steps})" in capsys.readouterr().err
    )
    _same(resumed, whole)
    assert _history(stopped) == _history(tmp_path / "whole")


def test_a_checkpoint_of_another_fit_in_the_folder_is_not_resumed(sites, tmp_path, monkeypatch):
    out = tmp_path / "finetune"
    _kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        _run("finetune", _cfg(), sites, out)
    monkeypatch.undo()
    assert (out / FILENAME).is_file()

    other = _cfg(lr=3e-4)  # the folder's checkpoint is of the fit with the default rate
    started_afresh = _run("finetune", other, sites, out)
    _same(started_afresh, _run("finetune", other, sites, tmp_path / "fresh"))


@pytest.mark.parametrize("stage", ["simmim", "finetune"])
def test_a_finished_fit_is_not_trained_again_and_what_follows_draws_the_same(
    stage, sites, tmp_path, monkeypatch, capsys
):
    """A phase stopped after one of its stages finished: the rerun takes that stage's weights and
    result as they were, and the random numbers drawn after it are those of an unbroken run."""
    cfg = _cfg()
    first = _run(stage, cfg, sites, tmp_path)
    after_first = torch.rand(4)
    capsys.readouterr()

    taken = _count_steps(monkeypatch)
    again = _run(stage, cfg, sites, tmp_path)
    assert taken == [0]
    assert f"[{'finetune:lower' if stage == 'finetune' else 'pretrain:' + stage}] finished " in (
        capsys.readouterr().err
    )
    _same(again, first)
    assert again.metrics == first.metrics  # its own wall time too: nothing ran
    assert torch.equal(torch.rand(4), after_first)


def test_a_finished_fit_of_another_config_is_trained_anew(sites, tmp_path, monkeypatch):
    _run("finetune", _cfg(), sites, tmp_path)
    other = _cfg(lr=3e-4)
    taken = _count_steps(monkeypatch)
    retrained = _run("finetune", other, sites, tmp_path)
    assert taken[0] > 0
    _same(retrained, _run("finetune", other, sites, tmp_path / "fresh"))
