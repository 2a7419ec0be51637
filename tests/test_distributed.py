"""Several processes per site (common/distributed.py) on CPU with gloo: N ranks compute what one
process computes on the same global batch — MT-NXent's loss and gradients, a fine-tuning step with
the decoder's BatchNorm, the best checkpoint — a failing rank ends the stage with its error, and a
two-process study runs through the federated workflow to a clean audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from common import distributed
from common.config import ConfigError, load_experiment
from common.data.manifest import load_site
from common.fl.audit import audit_run
from common.losses import MTNXentLoss
from common.resume import FILENAME as RESUME_FILE
from common.stages import contrastive_step, finetune, pretrain

TWO = {"runtime.world_size": 2}


# --------------------------------------------------------------------------- MT-NXent, gathered
def _views(seed: int = 0):
    """A global batch of 8 frames from 3 videos whose temporal neighbours straddle the ranks'
    shares (frames 0-3 on rank 0, 4-7 on rank 1), float64."""
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "view2": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "video": torch.tensor([0, 1, 2, 0, 0, 1, 2, 1]),
        "frame": torch.tensor([10, 3, 7, 11, 12, 40, 9, 4]),
    }


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _contrastive_grads(negatives: str) -> dict:
    """Run in each rank: that rank's share of ``_views()`` through DDP and MT-NXent; rank 0
    returns the loss and the (averaged) gradients."""
    net = _encoder()
    step = contrastive_step(distributed.wrap(net, torch.device("cpu")), MTNXentLoss(0.5, 3),
                            negatives)  # fmt: skip
    batch = _views()
    r = distributed.current()
    share = slice(r.rank * 8 // r.world, (r.rank + 1) * 8 // r.world)
    loss = step({k: v[share] for k, v in batch.items()})["loss"]
    loss.backward()
    per_rank = [torch.zeros(1, dtype=torch.float64) for _ in range(r.world)]
    dist.all_gather(per_rank, loss.detach().reshape(1))
    return {
        "loss": loss.item(),
        "per_rank": [float(x) for x in per_rank],
        "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
    }


def test_mtnxent_over_two_processes_is_the_one_process_loss_and_gradient_of_the_global_batch(
    tmp_path,
):
    net = _encoder()
    loss = contrastive_step(net, MTNXentLoss(0.5, 3))(_views())["loss"]
    loss.backward()
    two = distributed.spawn(_contrastive_grads, ("global",), world_size=2, device="cpu",
                            workdir=tmp_path, what="test")  # fmt: skip
    assert two["loss"] == pytest.approx(loss.item(), abs=1e-12)
    assert two["per_rank"][0] == two["per_rank"][1]  # every rank computes the global loss
    for name, p in net.named_parameters():
        torch.testing.assert_close(two["grads"][name], p.grad, atol=1e-6, rtol=0)
    # the authors' script: each rank's share alone; the mean of those is what DDP descends
    own = distributed.spawn(_contrastive_grads, ("per-device",), world_size=2, device="cpu",
                            workdir=tmp_path, what="test")  # fmt: skip
    alone = contrastive_step(_encoder(), MTNXentLoss(0.5, 3))
    halves = [alone({k: v[s] for k, v in _views().items()})["loss"]
              for s in (slice(0, 4), slice(4, 8))]  # fmt: skip
    assert own["per_rank"] == pytest.approx([float(h) for h in halves], abs=1e-12)
    assert abs(loss.item() - sum(own["per_rank"]) / 2) > 1e-3  # fewer negatives: another loss


# --------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from simulations.demo_data import demo_data

    root = tmp_path_factory.mktemp("dist")
    source, target = demo_data(Path("configs/tiny.yaml"), root / "data")
    return {"source": load_site(source), "target": load_site(target), "root": root}


def _finetune(site, out: Path, **settings):
    cfg = load_experiment("configs/tiny.yaml", overrides=settings)
    return finetune(cfg, site, out, None, "lower", progress=False)


def test_one_fine_tuning_step_in_two_processes_gives_the_one_process_weights(sites, tmp_path):
    sgd = {"finetune.optim.optimizer": "sgd", "finetune.optim.momentum": 0.99,
           "finetune.optim.lr": 0.01, "finetune.optim.max_steps": 1}  # fmt: skip
    one = _finetune(sites["source"], tmp_path / "one", **sgd)
    two = _finetune(sites["source"], tmp_path / "two", **sgd, **TWO)
    assert two.state.keys() == one.state.keys()
    for k in one.state:  # the decoder's BatchNorm running statistics included
        torch.testing.assert_close(two.state[k], one.state[k], atol=1e-6, rtol=1e-5, msg=k)
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-6)


def test_fine_tuning_in_two_processes_picks_the_one_process_checkpoint(sites, tmp_path):
    steps = {"finetune.optim.max_steps": 3, "finetune.optim.val_every": 1}
    one = _finetune(sites["source"], tmp_path / "one", **steps)
    two = _finetune(sites["source"], tmp_path / "two", **steps, **TWO)
    for k in ("best_val_loss", "train_loss"):  # AdamW: the ranks' float noise stays small
        assert two.metrics[k] == pytest.approx(one.metrics[k], rel=1e-5), k
    assert two.metrics["best_step"] == one.metrics["best_step"]
    assert two.metrics["images_per_s"] > 0 and two.num_examples == one.num_examples
    # rank 0 alone wrote the stage's files, and no rank left a result or a trace behind (only a
    # one-process fit keeps a resume checkpoint: common/resume.py)
    assert (tmp_path / "two" / "history.json").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir() if p.name != RESUME_FILE
    )


def test_pretraining_branches_run_in_two_processes(sites, tmp_path):
    cfg = load_experiment("configs/tiny.yaml", overrides=TWO)
    for branch in ("simmim", "contrastive"):
        res = pretrain(cfg, branch, sites["target"], tmp_path / branch, progress=False)
        assert res.metrics["steps"] == 4 and res.num_examples > 0
        assert all(torch.isfinite(t).all() for t in res.state.values())
        assert (tmp_path / branch / "model_local.pt").is_file()


def test_a_batch_that_does_not_split_between_the_processes_is_a_clear_error(sites, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.optim.batch_size \(8\) must divide by "
                       r"runtime.world_size \(3\)"):  # fmt: skip
        load_experiment("configs/tiny.yaml", overrides={
            "runtime.world_size": 3, "simmim.optim.batch_size": 9,
            "contrastive.optim.batch_size": 9})  # fmt: skip
    # a site with fewer frames than a batch: the batch is the site, and it must split too
    cfg = load_experiment("configs/tiny.yaml", overrides={**TWO, "finetune.optim.batch_size": 64})
    few = sites["source"]
    few = type(few)(few.root, few.meta, [r for r in few.rows if r.split != "train"] + [
        r for r in few.rows if r.split == "train" and r.labeled][:5])  # fmt: skip
    with pytest.raises(distributed.DistributedStageError,
                       match=r"finetune:lower at 'lumify': rank \d of 2 failed: ValueError: a "
                             r"batch of 5 frames does not split evenly"):  # fmt: skip
        finetune(cfg, few, tmp_path, None, "lower", progress=False)


# --------------------------------------------------------------------------- failures
def _fails_on_rank_one() -> None:
    if distributed.current().rank == 1:
        raise FloatingPointError("[finetune:lower] loss became nan at step 3")
    dist.barrier()  # rank 0 waits on a rank that will never come


def test_a_failing_rank_ends_the_stage_with_its_error_and_no_rank_is_left_waiting(tmp_path):
    with pytest.raises(distributed.DistributedStageError) as err:
        distributed.spawn(_fails_on_rank_one, (), world_size=2, device="cpu", workdir=tmp_path,
                          what="finetune:lower at 'lumify'")  # fmt: skip
    said = str(err.value)
    assert said.startswith("finetune:lower at 'lumify': rank 1 of 2 failed: FloatingPointError")
    assert "loss became nan at step 3" in said
    assert list(tmp_path.iterdir()) == []  # no result file, no trace left behind


def test_gpus_asked_for_and_not_there_is_a_clear_error(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are here")
    with pytest.raises(distributed.DistributedStageError, match="needs 2 GPUs"):
        distributed.spawn(print, (), world_size=2, device="cuda", workdir=tmp_path, what="x")


def test_sharded_batches_are_the_one_process_batches_split_in_rank_order():
    batches = [[5, 3, 9, 1, 0, 2], [7, 8, 4, 6]]
    shares = [list(distributed.ShardedBatches(batches, distributed.Rank(r, 2))) for r in (0, 1)]
    assert shares == [[[5, 3, 9], [7, 8]], [[1, 0, 2], [4, 6]]]
    with pytest.raises(ValueError, match="a batch of 3 frames does not split evenly"):
        list(distributed.ShardedBatches([[1, 2, 3]], distributed.Rank(0, 2)))


# --------------------------------------------------------------------------- the workflow
@pytest.mark.slow
def test_a_two_process_study_runs_through_flowers_simulation_and_audits_clean(tmp_path):
    """`crossprobe simulate` with runtime.world_size 2: each training stage, inside its Ray
    worker, starts two gloo ranks; the study completes and its ledgers audit clean."""
    from simulations.simulate import run_simulation, started_processes

    config = tmp_path / "two.yaml"
    config.write_text(f"base: {Path('configs/tiny.yaml').resolve()}\nname: two\n"
                      "runtime: {world_size: 2}\n")  # fmt: skip
    run = tmp_path / "run"
    try:
        summary = run_simulation(config, run, timeout=540)
    finally:
        leftover = started_processes(run / ".flwr")
    assert summary["status"] == "finished:completed" and leftover == []
    histories = sorted((run / "sites").glob("*/*-r1/history.json"))
    stages = {h.parent.name: json.loads(h.read_text())["processes"] for h in histories}
    assert stages == {name: 2 for name in (
        "pretrain-simmim-r1", "pretrain-contrastive-r1", "finetune-simmim-r1",
        "finetune-mtnxent-r1", "finetune-lower-r1", "finetune-upper-r1")}  # fmt: skip
    report = audit_run(run)
    assert report.ok, report.render()
