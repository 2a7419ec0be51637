"""The ONE training loop every stage uses (SimMIM, contrastive, fine-tune, upper bound).

A stage supplies ``step(batch) -> dict[str, Tensor]`` whose ``"loss"`` is minimised; everything else
(device moves, channels-last, bf16 autocast, optimiser steps, validation, best checkpoint, progress
with ETA, loss history and its plot) lives here once.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import distributed
from common.config import OptimConfig
from common.resume import Resumable

Step = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


@cache
def bf16_supported(device: str) -> bool:
    """Whether bf16 autocast is worth enabling on ``device`` (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX; elsewhere bf16 is emulated and slower)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def autocast(device: torch.device | str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for and supported; a no-op otherwise."""
    dev = torch.device(device)
    if bf16 and bf16_supported(str(dev)):
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(
    batch: Mapping[str, Any], device: torch.device | str, channels_last: bool = False
) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (4-D float tensors channels-last if asked)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    cfg: OptimConfig,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The stage's optimiser from its config (``weight_decay`` overrides the config's). ``params``
    may be parameter groups, each with an ``lr_scale`` (its lr is ``cfg.lr`` times that)."""
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [
            {"params": [p for p in g["params"] if p.requires_grad], "lr": cfg.lr * g["lr_scale"]}
            for g in params
        ]
    else:
        params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress:
    """Throttled progress lines on stderr: phase, epoch, step, loss, images/s, ETA."""

    def __init__(
        self, phase: str, total_steps: int, every_s: float = 5.0, stream=None, enabled: bool = True
    ):
        self.phase, self.total, self.every_s = phase, max(total_steps, 1), every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def update(
        self, step: int, epoch: int, epochs: int, loss: float, images: int, force: bool = False
    ) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        el = now - self.t0
        eta = el / step * (self.total - step) if step else math.inf
        print(
            f"[{self.phase}] epoch {epoch}/{epochs} step {step}/{self.total} loss {loss:.4f} "
            f"{images / max(el, 1e-9):.1f} img/s elapsed {_fmt_eta(el)} ETA {_fmt_eta(eta)}",
            file=self.stream,
            flush=True,
        )


@dataclass
class FitResult:
    """What a fit did. ``best_val`` is None when there was no validation data."""

    steps: int
    epochs: int
    seconds: float
    images: int
    train_loss: float
    best_val: float | None = None
    best_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def metrics(self) -> dict[str, float]:
        m = {
            "steps": float(self.steps),
            "epochs": float(self.epochs),
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "train_loss": self.train_loss,
        }
        if self.best_val is not None:
            m["best_val_loss"] = self.best_val
            m["best_step"] = float(self.best_step or 0)
        return m


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Tell epoch-seeded datasets/samplers (fresh augmentations, fresh video groups) the epoch."""
    for obj in (
        getattr(loader, "dataset", None),
        getattr(loader, "batch_sampler", None),
        getattr(loader, "sampler", None),
    ):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return 0


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, step: Step, loader: Iterable, device, bf16=False, channels_last=False
) -> float:
    """Example-weighted mean of ``step(batch)["loss"]`` over ``loader`` in eval mode."""
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        with autocast(device, bf16):
            loss = step(batch)["loss"]
        b = _batch_size(batch)
        total += float(loss) * b
        n += b
    model.train()
    return total / max(n, 1)


def _prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> None:
    """Move ``model`` to ``device`` (channels-last if asked) and put it in train mode."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()


def _plan_steps(
    train_loader: Iterable, epochs: int, max_steps: int | None, phase: str
) -> tuple[int, int]:
    """(optimiser steps, epochs) of a fit: ``max_steps`` caps ``epochs`` worth of steps, and more
    epochs are run when ``max_steps`` needs them. Raises ValueError for empty training data."""
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = max_steps or 1
    if steps_per_epoch == 0:
        raise ValueError(f"[{phase}] the training data is empty")
    total = (
        epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    )
    # enough epochs to reach max_steps when an epoch is short
    if max_steps is not None and max_steps > epochs * steps_per_epoch:
        total = max_steps
        epochs = math.ceil(max_steps / steps_per_epoch)
    return total, epochs


def scheduled_lr(
    base_lr: float, step_i: int, total: int, warmup_steps: int = 0, schedule: str = "constant"
) -> float:
    """The learning rate of optimiser step ``step_i`` (0-based) of ``total``.

    Linear warm-up over the first ``warmup_steps`` steps (step ``step_i`` uses
    ``(step_i + 1) / warmup_steps`` of the base rate), then ``schedule``: ``constant``; ``poly``,
    ``(1 - t / T) ** 0.9`` as the TransUNet authors' trainer decays it; or ``cosine``,
    ``(1 + cos(pi t / T)) / 2``, where t counts the steps after the warm-up and T is
    ``total - warmup_steps``.
    """
    if warmup_steps and step_i < warmup_steps:
        return base_lr * (step_i + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    done = (step_i - warmup_steps) / max(1, total - warmup_steps)  # 0 right after the warm-up
    if schedule == "poly":
        return base_lr * (1.0 - done) ** 0.9
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"lr_schedule must be constant, poly or cosine (got {schedule!r})")


def _set_lr(optimizer: torch.optim.Optimizer, lrs: Iterable[float]) -> None:
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr


def _optimizer_step(
    step: Step,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    device: torch.device,
    bf16: bool,
    phase: str,
    step_i: int,
) -> dict[str, torch.Tensor]:
    """Forward ``step(batch)`` (autocast), backward its loss and step ``optimizer``; return the
    step's outputs. Raises FloatingPointError when the loss is not finite."""
    with autocast(device, bf16):
        out = step(batch)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"[{phase}] loss became {float(loss.detach())} at step {step_i + 1}"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out


@dataclass
class _TrainState:
    """A fit's counters, its loss history and its progress line, updated step by step."""

    total: int  # optimiser steps to run
    epochs: int
    progress: Progress
    steps: int = 0
    images: int = 0
    epoch: int = 0
    recent: list[float] = field(default_factory=list)  # the last 10 training losses
    history: list[dict[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # wall time, set by stop_clock()

    def log_step(self, out: dict[str, torch.Tensor], batch: Mapping[str, Any]) -> None:
        """Count a finished optimiser step on ``batch``, record its losses, report progress."""
        self.steps += 1
        self.images += _batch_size(batch) * distributed.current().world
        lv = distributed.global_mean(float(out["loss"].detach()))
        self.recent = (self.recent + [lv])[-10:]
        self.history.append(
            {
                "step": float(self.steps),
                "loss": lv,
                **{k: float(v) for k, v in out.items() if k != "loss"},
            }
        )
        self.progress.update(self.steps, self.epoch, self.epochs, lv, self.images)

    def stop_clock(self) -> None:
        """Record the wall time of the fit and print the final progress line."""
        self.seconds = time.perf_counter() - self.t0
        last = self.recent[-1] if self.recent else float("nan")
        self.progress.update(self.steps, self.epoch, self.epochs, last, self.images, force=True)

    def result(self, validation: _Validation) -> FitResult:
        """The fit's summary: counts, wall time, mean of the last 10 losses, best validation."""
        return FitResult(
            steps=self.steps,
            epochs=self.epoch,
            seconds=self.seconds,
            images=self.images,
            train_loss=sum(self.recent) / max(len(self.recent), 1),
            best_val=validation.best_val,
            best_step=validation.best_step,
            history=self.history,
        )


class _Ema:
    """An exponential moving average of a model's float weights (parameters and buffers), updated
    after every optimiser step. Its decay ramps up as (1 + t) / (10 + t), so the first steps do
    not drag the average back to the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: t.detach().clone() for k, t in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                self.shadow[k].mul_(d).add_(t.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(t)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The averaged weights in ``model`` for the duration (the training weights after)."""
        training = {k: t.detach().clone() for k, t in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(training)


class _Validation:
    """Validation during a fit: scores the current weights and keeps the best (lowest-loss) ones,
    in ``path`` (a safetensors file) when given, else as a copy in memory."""

    def __init__(
        self,
        model: nn.Module,
        step: Step,
        loader: Iterable | None,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        path: Path | None,
    ):
        self.model, self.step, self.loader, self.path = model, step, loader, path
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.best_mem: dict[str, torch.Tensor] | None = None

    def __call__(self, state: _TrainState) -> None:
        """Validate now (no-op without validation data): log the loss, keep the weights if best."""
        if self.loader is None:
            return
        v = evaluate_loss(
            self.model, self.step, self.loader, self.device, self.bf16, self.channels_last
        )
        state.history.append({"step": float(state.steps), "val_loss": v})
        if self.best_val is None or v < self.best_val:
            self.best_val, self.best_step = v, state.steps
            if distributed.current().main:  # only rank 0 returns weights
                self._keep_weights()

    def _keep_weights(self) -> None:
        state_dict = self.model.state_dict()
        if self.path is not None:
            from safetensors.torch import save_file

            save_file({k: t.contiguous() for k, t in state_dict.items()}, str(self.path))
        else:
            self.best_mem = {k: t.detach().clone() for k, t in state_dict.items()}

    def restore_best(self) -> None:
        """Load the best weights back into the model (if any validation ran; rank 0 only)."""
        if self.best_val is None or not distributed.current().main:
            return
        if self.path is not None:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(str(self.path), device=str(self.device)))
        elif self.best_mem is not None:
            self.model.load_state_dict(self.best_mem)


def _train_epoch(
    loader: Iterable,
    state: _TrainState,
    train_on: Callable[[Mapping[str, Any]], None],
    validate: Callable[[_TrainState], None],
    val_every: int,
) -> None:
    """One pass over ``loader`` (stopping at the step budget); validate every ``val_every`` steps,
    or once at the end of the epoch when ``val_every`` is 0."""
    for batch in loader:
        if state.steps >= state.total:
            break
        train_on(batch)
        if val_every and state.steps % val_every == 0:
            validate(state)
    if not val_every:
        validate(state)


def fit(
    model: nn.Module,
    step: Step,
    train_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    epochs: int = 1,
    max_steps: int | None = None,
    val_loader: Iterable | None = None,
    val_every: int = 0,
    val_step: Step | None = None,
    warmup_steps: int = 0,
    lr_schedule: str = "constant",
    ema_decay: float = 0.0,
    bf16: bool = False,
    channels_last: bool = False,
    phase: str = "train",
    out_dir: Path | None = None,
    progress: bool = True,
    resume: Resumable | None = None,
) -> FitResult:
    """Train ``model`` with ``step``; the best checkpoint by validation loss is kept and restored.

    Args:
        step: batch (already on ``device``) -> {"loss": scalar, ...}; extra entries are logged.
        epochs / max_steps: the budget; ``max_steps`` caps the total number of optimiser steps.
        val_loader: optional; evaluated every ``val_every`` steps (0 = each epoch end) with
            ``val_step`` (default: ``step``) under ``no_grad``; the lowest-loss weights are
            restored at the end.
        warmup_steps / lr_schedule: each parameter group's rate per step (``scheduled_lr``).
        ema_decay: 0 = off; else an exponential moving average of the weights is what validation
            scores and what the fit keeps (the average itself when there is no validation).
        out_dir: if given, ``history.json``, ``loss.png`` and the best checkpoint
            (``best.safetensors``) are written there, so nothing large is kept twice in memory.
        resume: if given (with ``out_dir``, in a one-process fit), the fit's state is saved at the
            end of every epoch, and a fit that finds a checkpoint of its own key there goes on
            from it, to the same end as if it had never stopped; once finished, the final weights
            and result are kept there and a rerun returns them untrained (common/resume.py).
    In a multi-process stage (common/distributed.py) every rank calls ``fit`` with its share of
    each training batch and the whole validation set (so every rank picks the same checkpoint
    one process would); the logged loss is the ranks' mean, and only rank 0 prints, writes and
    keeps the best weights.
    Returns:
        FitResult with counts, wall time, images/s, final train loss (mean of the last 10 steps) and
        the best validation loss.
    """
    device = torch.device(device)
    _prepare_model(model, device, channels_last)
    total, epochs = _plan_steps(train_loader, epochs, max_steps, phase)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    main = distributed.current().main  # in a multi-process stage rank 0 reports and writes
    state = _TrainState(total, epochs, Progress(phase, total, enabled=progress and main))
    out_dir = out_dir if main else None
    best_path = out_dir / "best.safetensors" if out_dir is not None else None
    validation = _Validation(
        model, val_step or step, val_loader, device, bf16, channels_last, best_path
    )
    ema = _Ema(model, ema_decay) if ema_decay else None
    if out_dir is None or distributed.current().world > 1:
        resume = None
    saved = resume.load() if resume is not None else None
    if saved is not None and "finished" in saved:
        return _finished(saved["finished"], model, state.progress, phase)
    _resume(saved, model, optimizer, ema, state, validation, device, phase)

    def train_on(batch: Mapping[str, Any]) -> None:
        batch = to_device(batch, device, channels_last)
        _set_lr(
            optimizer,
            (scheduled_lr(lr, state.steps, total, warmup_steps, lr_schedule) for lr in base_lrs),
        )
        out = _optimizer_step(step, optimizer, batch, device, bf16, phase, state.steps)
        if ema is not None:
            ema.update(model)
        state.log_step(out, batch)

    def validate(state: _TrainState) -> None:
        # with weight averaging, the average is what is scored and kept
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            validation(state)

    while state.steps < total:
        state.epoch += 1
        _set_epoch(train_loader, state.epoch)
        _train_epoch(train_loader, state, train_on, validate, val_every)
        if resume is not None and state.steps < total:
            resume.save(_fit_state(model, optimizer, ema, state, validation))
    if val_every and state.steps % val_every:
        validate(state)  # the final weights are a candidate too
    state.stop_clock()
    if ema is not None and validation.best_val is None:
        model.load_state_dict(ema.shadow)  # no validation: the average is the result
    validation.restore_best()
    result = state.result(validation)
    if out_dir is not None:
        write_history(result, out_dir, phase)
    if resume is not None:  # a rerun of this fit (its phase stopped later) takes it as it is
        resume.save({"finished": {"model": model.state_dict(), "result": asdict(result)}})
    return result


def _fit_state(model, optimizer, ema: _Ema | None, state: _TrainState, validation) -> dict:
    """What a fit needs to go on after this epoch (common/resume.py saves it)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": None if ema is None else {"shadow": ema.shadow, "updates": ema.updates},
        "counters": {
            "steps": state.steps,
            "images": state.images,
            "epoch": state.epoch,
            "seconds": time.perf_counter() - state.t0,
        },
        "recent": state.recent,
        "history": state.history,
        "best": {"val": validation.best_val, "step": validation.best_step},
    }


def _finished(finished: dict, model, progress: Progress, phase: str) -> FitResult:
    """A fit that had already run to its end: its final weights and result, without training."""
    model.load_state_dict(finished["model"])
    result = FitResult(**finished["result"])
    if progress.enabled:
        print(
            f"[{phase}] finished earlier ({result.epochs} epochs, {result.steps} steps): "
            "its weights are reused",
            file=progress.stream,
            flush=True,
        )
    return result


def _resume(saved, model, optimizer, ema, state: _TrainState, validation, device, phase) -> None:
    """Put a fit back where ``saved`` (``_fit_state``) left it; nothing when there is none."""
    if saved is None:
        return
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None and saved["ema"] is not None:
        ema.shadow = {k: t.to(device) for k, t in saved["ema"]["shadow"].items()}
        ema.updates = saved["ema"]["updates"]
    counters = saved["counters"]
    state.steps, state.images = counters["steps"], counters["images"]
    state.epoch = counters["epoch"]
    state.recent, state.history = list(saved["recent"]), list(saved["history"])
    state.t0 -= counters["seconds"]  # wall time and ETA count the time before the stop too
    state.progress.t0 -= counters["seconds"]
    validation.best_val, validation.best_step = saved["best"]["val"], saved["best"]["step"]
    if state.progress.enabled:
        print(
            f"[{phase}] resumed after epoch {state.epoch}/{state.epochs} "
            f"(step {state.steps}/{state.total})",
            file=state.progress.stream,
            flush=True,
        )


def write_history(result: FitResult, out_dir: Path, phase: str) -> None:
    """``history.json`` and a loss-curve picture ``loss.png`` (train, and validation if any)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(
        json.dumps(
            {
                "phase": phase,
                "processes": distributed.current().world,  # runtime.world_size it ran with
                **result.metrics(),
                "history": result.history,
            }
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency; pictures are a bonus
        return
    tr = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
    va = [(h["step"], h["val_loss"]) for h in result.history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=0.8, label="train")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(phase)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png")
    plt.close(fig)
