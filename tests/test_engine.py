"""The one training loop: each stage's real `step` learns (loss goes down in 20 steps), the best
validation checkpoint is what comes back, progress is shown, history is written."""

import json
import math

import pytest
import torch

from common.config import load_experiment
from common.engine import bf16_supported, fit, make_optimizer
from common.losses import DiceBCELoss, MTNXentLoss
from common.models import ContrastiveModel, SimMIMModel, build_transunet
from common.stages import contrastive_step, segmentation_step, simmim_step


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random 'frames': a bright band at a random depth over noise (bone-like)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).view(1, size, 1).float()
    depth = torch.randint(size // 4, 3 * size // 4, (n, 1, 1), generator=g).float()
    band = torch.exp(-((rows - depth) ** 2) / 8.0).expand(n, size, size)
    x = (0.8 * band + 0.2 * torch.rand(n, size, size, generator=g)).clamp(0, 1)
    return x.unsqueeze(1).repeat(1, 3, 1, 1)


def _repeat(batch: dict, n: int):
    return [batch] * n


def _run(model, step, batch, lr, steps=20):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    res = fit(model, step, _repeat(batch, steps), opt, max_steps=steps, progress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    return losses, res


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_simmim_loss_goes_down(name):
    cfg = load_experiment(f"configs/{name}.yaml")
    torch.manual_seed(0)
    model = SimMIMModel(cfg.model)
    step = simmim_step(model, cfg.simmim, cfg.model.img_size, torch.Generator().manual_seed(0))
    losses, _ = _run(model, step, {"image": _images(4, cfg.model.img_size)}, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_contrastive_loss_goes_down(name):
    cfg = load_experiment(f"configs/{name}.yaml")
    torch.manual_seed(0)
    model = ContrastiveModel(cfg.model)
    x = _images(8, cfg.model.img_size)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    batch = {
        "view1": x,
        "view2": (x + noise).clamp(0, 1),
        "video": torch.arange(8) % 2,
        "frame": torch.arange(8) * 10,
    }
    step = contrastive_step(model, MTNXentLoss(0.5, 15))
    losses, _ = _run(model, step, batch, lr=1e-3)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_finetune_loss_goes_down(name):
    cfg = load_experiment(f"configs/{name}.yaml")
    torch.manual_seed(0)
    model = build_transunet(cfg.model)
    x = _images(4, cfg.model.img_size)
    batch = {"image": x, "mask": (x[:, :1] > 0.6).float()}
    losses, _ = _run(model, segmentation_step(model, DiceBCELoss()), batch, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3


def test_best_validation_checkpoint_is_restored(tmp_path):
    # a 1-parameter model; validation loss is (w - 1)², training drives w past 1 to 3
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)

    def step(batch):
        w = model.weight.squeeze()
        return {"loss": (w - batch["target"].squeeze()) ** 2}

    train = [{"target": torch.tensor([3.0])}] * 40
    val = [{"target": torch.tensor([1.0])}]

    # validation after every step; best is nearest to w = 1
    res = fit(
        model,
        step,
        train,
        torch.optim.SGD(model.parameters(), lr=0.05),
        max_steps=40,
        val_loader=val,
        val_every=1,
        progress=False,
        out_dir=tmp_path,
    )
    assert res.best_val is not None and res.best_val < 0.05
    assert abs(model.weight.item() - 1.0) < 0.25  # restored, not the final w ≈ 2.6
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["best_val_loss"] == pytest.approx(res.best_val)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "best.safetensors").exists()


def test_progress_lines_show_phase_loss_and_eta(capsys):
    model = torch.nn.Linear(2, 1)
    step = lambda b: {"loss": model(b["x"]).pow(2).mean()}  # noqa: E731
    fit(
        model,
        step,
        [{"x": torch.randn(4, 2)}] * 5,
        torch.optim.SGD(model.parameters(), lr=0.01),
        max_steps=5,
        phase="demo-phase",
    )
    err = capsys.readouterr().err
    assert "[demo-phase]" in err and "loss" in err and "ETA" in err and "step 5/5" in err


def test_nonfinite_loss_stops_with_phase_named():
    model = torch.nn.Linear(1, 1)
    step = lambda b: {"loss": model.weight.sum() * float("nan")}  # noqa: E731
    with pytest.raises(FloatingPointError, match="finetune:x"):
        fit(
            model,
            step,
            [{"x": torch.zeros(1)}],
            torch.optim.SGD(model.parameters(), lr=0.1),
            phase="finetune:x",
            progress=False,
        )


def test_bf16_request_is_safe_on_any_cpu():
    # bf16 is only enabled where supported; either way a step runs and gives a finite loss
    model = torch.nn.Linear(4, 1)
    step = lambda b: {"loss": model(b["x"]).pow(2).mean()}  # noqa: E731
    res = fit(
        model,
        step,
        [{"x": torch.randn(8, 4)}] * 3,
        make_optimizer(model.parameters(), load_experiment("configs/tiny.yaml").finetune.optim),
        bf16=True,
        channels_last=True,
        progress=False,
    )
    assert res.steps == 3 and math.isfinite(res.train_loss)
    assert isinstance(bf16_supported("cpu"), bool)


def _line_fit(ema_decay: float, val: list | None = None, steps: int = 12):
    """A 1-d least-squares fit by plain SGD, recording the weights after every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    x = torch.linspace(-1, 1, 8).view(-1, 1)
    batch = {"x": x, "y": 3 * x + 1}
    seen = []

    def step(b):
        loss = (model(b["x"]) - b["y"]).pow(2).mean()
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"loss": loss}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = fit(model, step, [batch] * steps, opt, max_steps=steps, val_loader=val, val_every=4,
              ema_decay=ema_decay, progress=False)  # fmt: skip
    return model, res, seen


def test_ema_is_the_ramped_moving_average_of_the_weights_and_what_validation_scores():
    model, _, _ = _line_fit(0.9)
    plain_model, _, plain = _line_fit(0.0)  # the same training path: the average does not steer
    # `plain` holds the weights each step started from, so the weights after step t are plain[t]
    after = [*plain[1:], {k: v.detach() for k, v in plain_model.state_dict().items()}]
    avg = {k: v.clone() for k, v in plain[0].items()}
    for t, w in enumerate(after, start=1):  # the slow reference, from the definition
        d = min(0.9, (1 + t) / (10 + t))
        avg = {k: d * avg[k] + (1 - d) * w[k] for k in avg}
    for k, v in model.state_dict().items():  # no validation: the average is the result
        torch.testing.assert_close(v, avg[k], atol=1e-6, rtol=1e-6, msg=k)
    # with validation: each logged validation loss is the loss of the averaged weights
    x = torch.linspace(-1, 1, 8).view(-1, 1)
    model, res, _ = _line_fit(0.9, val=[{"x": x, "y": 3 * x + 1}])
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert len(vals) == 3 and res.best_val == min(vals)
    final = float((model(x) - (3 * x + 1)).pow(2).mean())
    assert final == pytest.approx(res.best_val, rel=1e-6)  # the kept weights are an average
    _, plain_res, _ = _line_fit(0.0, val=[{"x": x, "y": 3 * x + 1}])
    assert plain_res.best_val != pytest.approx(res.best_val, rel=1e-3)


@pytest.mark.parametrize("schedule", ["constant", "poly", "cosine"])
def test_each_step_trains_at_the_scheduled_rate_of_every_group(schedule):
    # the rates the optimiser really used, against the schedules written out from their definitions
    total, warmup = 10, 3
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}]
    )
    used = []

    def step(b):
        used.append([g["lr"] for g in opt.param_groups])
        return {"loss": model(b["x"]).pow(2).mean()}

    fit(model, step, [{"x": torch.ones(4, 2)}] * total, opt, max_steps=total,
        warmup_steps=warmup, lr_schedule=schedule, progress=False)  # fmt: skip

    def reference(base: float, i: int) -> float:
        if i < warmup:
            return base * (i + 1) / warmup
        t, T = i - warmup, total - warmup
        return {
            "constant": base,
            "poly": base * (1 - t / T) ** 0.9,
            "cosine": base * (1 + math.cos(math.pi * t / T)) / 2,
        }[schedule]

    assert len(used) == total
    for i, rates in enumerate(used):
        assert rates == pytest.approx([reference(0.1, i), reference(0.01, i)], rel=1e-12), i
    if schedule != "constant":  # a decaying rate ends on small steps
        assert used[-1][0] < 0.1 * 0.2
