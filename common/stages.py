"""The paper's three stages as framework-free functions: pretrain (SimMIM | MT-NXent | SimCLR),
fine-tune (DiceBCE, best by source-validation loss) and evaluate (single models + fusion).

Each takes the typed experiment config, one site's data and that site's own output folder, and
returns only what may leave the site: weights and scalars (plus per-image score vectors). Everything
else — checkpoints, loss curves, fusion-weight maps, prediction overlays — is written under
``out_dir``. The federated clients and the in-process runner call these same functions.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.config import ExperimentConfig, SimMIMConfig
from common.engine import Step, autocast, fit, make_optimizer, to_device
from common.fusion import fuse
from common.losses import DiceBCELoss, MTNXentLoss, masked_l1
from common.metrics import dice_iou, group_means
from common.models import (
    ContrastiveModel,
    SimMIMModel,
    apply_mask,
    build_transunet,
    encoder_state_dict,
    load_encoder,
    simmim_mask,
)

if TYPE_CHECKING:
    from common.data.manifest import SiteData

BRANCHES = ("simmim", "contrastive", "simclr")
CONTRASTIVE_PREFIXES = ("mtnxent", "simclr", "contrastive")


@dataclass
class StageResult:
    """What a training stage ships: weights, scalar metrics, and the example count for averaging."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    num_examples: int


@dataclass
class EvalResult:
    """Scores only. ``per_image``/``per_video`` hold one list per "<method>/<metric>" key, in the
    same image (video) order for every method, so methods can be compared pairwise."""

    metrics: dict[str, float]
    per_image: dict[str, list[float]] = field(default_factory=dict)
    per_video: dict[str, list[float]] = field(default_factory=dict)
    num_examples: int = 0
    per_patient: dict[str, list[float]] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _setup(cfg: ExperimentConfig) -> torch.device:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    return torch.device(cfg.runtime.device)


def _loader(
    ds,
    batch_size: int,
    cfg: ExperimentConfig,
    gen: torch.Generator,
    shuffle=True,
    drop_last=True,
    batch_sampler=None,
) -> DataLoader:
    workers = cfg.runtime.num_workers
    common: dict[str, Any] = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": cfg.runtime.device.startswith("cuda"),
    }
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, **common)
    bs = min(batch_size, len(ds))
    return DataLoader(
        ds,
        batch_size=bs,
        shuffle=shuffle,
        drop_last=drop_last and len(ds) > bs,
        generator=gen,
        **common,
    )


def _fit_kwargs(
    cfg: ExperimentConfig, optim, device, phase: str, out_dir: Path, progress: bool
) -> dict[str, Any]:
    return {
        "device": device,
        "epochs": optim.epochs,
        "max_steps": optim.max_steps,
        "warmup_steps": optim.warmup_steps,
        "bf16": cfg.runtime.bf16,
        "channels_last": cfg.runtime.channels_last,
        "phase": phase,
        "out_dir": out_dir,
        "progress": progress,
    }


def simmim_step(model: SimMIMModel, scfg: SimMIMConfig, size: int, gen: torch.Generator) -> Step:
    """SimMIM: draw unit masks per sample, zero the masked pixels, reconstruct, masked L1.

    batch["image"]: (B, 3, S, S) in [0, 1].
    """

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        mask = simmim_mask(x.shape[0], size, scfg.mask_patch_size, scfg.mask_ratio, gen, x.device)
        x_in = apply_mask(x, mask, scfg.noise_ratio, scfg.mask_patch_size, gen)
        return {"loss": masked_l1(model(x_in).float(), x, mask)}

    return step


def contrastive_step(model: ContrastiveModel, loss_fn: MTNXentLoss) -> Step:
    """MT-NXent on two views. batch: view1, view2 (B, 3, S, S); video, frame (B,)."""

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = batch["view1"].shape[0]
        # one forward pass over both views: the encoder normalises per sample (GroupNorm/LayerNorm)
        z = model(torch.cat([batch["view1"], batch["view2"]]))
        return {"loss": loss_fn(z[:b].float(), z[b:].float(), batch["video"], batch["frame"])}

    return step


def segmentation_step(model: torch.nn.Module, loss_fn: DiceBCELoss) -> Step:
    """Supervised DiceBCE. batch: image (B, 3, S, S), mask (B, 1, S, S) in {0, 1}."""

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(model(batch["image"]), batch["mask"])}

    return step


def pretrain(
    cfg: ExperimentConfig,
    branch: str,
    site: SiteData,
    out_dir: Path,
    init_encoder: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    name: str | None = None,
) -> StageResult:
    """Self-supervised pretraining on the site's train frames (labels, if any, are ignored).

    Args:
        branch: "simmim" (masked L1 over masked pixels), "contrastive" (MT-NXent with
            ``cfg.contrastive``) or "simclr" (the same with min_frame_gap = 0).
        init_encoder: continue from these encoder weights (later federated rounds).
        name: the arm's name in progress lines (a study's variants share a branch).
    Returns:
        StageResult with the encoder weights only (decoder / projection head stay in ``out_dir``).
    Raises:
        ValueError: unknown branch or no train frames.
    """
    from common.data.datasets import FrameDataset, PairDataset, VideoBatchSampler

    if branch not in BRANCHES:
        raise ValueError(f"unknown pretraining branch {branch!r}; expected one of {BRANCHES}")
    device = _setup(cfg)
    gen = seed_everything(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.model.img_size
    if branch == "simmim":
        scfg = cfg.simmim
        optim = scfg.optim
        model = SimMIMModel(cfg.model)
        ds = FrameDataset(site, "train", size)
        loader = _loader(ds, optim.batch_size, cfg, gen)
        step = simmim_step(model, scfg, size, torch.Generator().manual_seed(cfg.seed + 1))

    else:
        ccfg = (
            cfg.contrastive
            if branch == "contrastive"
            else cfg.contrastive.model_copy(update={"min_frame_gap": 0})
        )
        optim = ccfg.optim
        model = ContrastiveModel(cfg.model)
        ds = PairDataset(site, "train", size, ccfg, seed=cfg.seed)
        sampler = None
        if ccfg.sampler == "video":
            sampler = VideoBatchSampler(
                ds.video_ids, min(optim.batch_size, len(ds)), ccfg.frames_per_video, cfg.seed
            )
        loader = _loader(ds, optim.batch_size, cfg, gen, batch_sampler=sampler)
        step = contrastive_step(model, MTNXentLoss(ccfg.temperature, ccfg.min_frame_gap))

    if len(ds) == 0:
        raise ValueError(f"site {site.name!r} has no train frames to pretrain on")
    if init_encoder is not None:
        load_encoder(model, init_encoder)
    opt = make_optimizer(model.parameters(), optim)
    res = fit(
        model,
        step,
        loader,
        opt,
        **_fit_kwargs(cfg, optim, device, f"pretrain:{name or branch}", out_dir, progress),
    )
    torch.save(
        model.state_dict(), out_dir / "model_local.pt"
    )  # decoder/projection head: never shipped
    return StageResult(encoder_state_dict(model.cpu()), res.metrics(), len(ds))


def is_contrastive_arm(arm: str) -> bool:
    return arm.startswith(CONTRASTIVE_PREFIXES)


def finetune(
    cfg: ExperimentConfig,
    site: SiteData,
    out_dir: Path,
    encoder: dict[str, torch.Tensor] | None,
    arm: str,
    init_model: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    contrastive: bool | None = None,
) -> StageResult:
    """Supervised TransUNet training on the site's labeled train frames with DiceBCE.

    Only ``encoder`` tensors are loaded into a fresh model (decoder and head random); ``None`` is the
    lower bound (random init, or ``cfg.model.checkpoint`` when set). ``init_model`` (a whole model
    from a previous federated round) takes precedence. Contrastive arms (``contrastive``, or when
    None an arm named mtnxent*/simclr*) use ``cfg.finetune.weight_decay_contrastive``. The checkpoint with the lowest validation DiceBCE is
    kept and returned; a site without labeled validation frames keeps the last one.

    Raises:
        EncoderMismatchError: ``encoder`` does not fit the model.
        ValueError: the site has no labeled train frames.
    """
    from common.data.datasets import SegDataset

    device = _setup(cfg)
    gen = seed_everything(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fcfg = cfg.finetune
    optim = fcfg.optim
    size = cfg.model.img_size
    if not site.select(split="train", labeled=True):
        raise ValueError(f"site {site.name!r} has no labeled train frames to fine-tune on")
    train = SegDataset(site, "train", size, augment=fcfg.augment, seed=cfg.seed)
    val = SegDataset(site, "val", size) if site.select(split="val", labeled=True) else None
    model = build_transunet(cfg.model, num_classes=1)
    if init_model is not None:
        model.load_state_dict(init_model)
    elif encoder is not None:
        load_encoder(model, encoder)
    step = segmentation_step(model, DiceBCELoss())
    if contrastive is None:
        contrastive = is_contrastive_arm(arm)
    wd = fcfg.weight_decay_contrastive if contrastive else optim.weight_decay
    opt = make_optimizer(model.parameters(), optim, weight_decay=wd)
    val_loader = (
        _loader(val, optim.batch_size, cfg, gen, shuffle=False, drop_last=False)
        if val is not None
        else None
    )
    res = fit(
        model,
        step,
        _loader(train, optim.batch_size, cfg, gen),
        opt,
        val_loader=val_loader,
        val_every=optim.val_every,
        **_fit_kwargs(cfg, optim, device, f"finetune:{arm}", out_dir, progress),
    )
    metrics = res.metrics()
    metrics["labeled_val_frames"] = float(len(val) if val is not None else 0)
    return StageResult(
        {k: v.detach() for k, v in model.cpu().state_dict().items()}, metrics, len(train)
    )


def fusion_name(mode: str, pair: tuple[str, str], first: bool) -> str:
    """``fusion-<mode>`` for the first (main) pair of a request, ``fusion-<mode>[a+b]`` for others."""
    return f"fusion-{mode}" if first else f"fusion-{mode}[{pair[0]}+{pair[1]}]"


@torch.inference_mode()
def evaluate(
    cfg: ExperimentConfig,
    site: SiteData,
    out_dir: Path,
    models: dict[str, dict[str, torch.Tensor]],
    fusions: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    split: str = "test",
    progress: bool = True,
) -> EvalResult:
    """Per-image Dice/IoU of each model and of each fusion (every mode in ``cfg.fusion.modes``)
    on the site's labeled ``split`` frames, at the model-size square.

    Writes, under ``out_dir/figures``: prediction overlays per method (paper Fig. 5) and fusion-weight
    maps (Fig. 6) for a few frames. Returns means, per-image and per-video score vectors.

    Raises:
        KeyError: a fusion names a model not in ``models``. ValueError: no labeled frames.
    """
    from common.data.datasets import SegDataset

    device = _setup(cfg)
    out_dir = Path(out_dir)
    if not site.select(split=split, labeled=True):
        raise ValueError(f"site {site.name!r} has no labeled {split!r} frames to evaluate on")
    ds = SegDataset(site, split, cfg.model.img_size)
    for a, b in fusions:
        for name in (a, b):
            if name not in models:
                raise KeyError(
                    f"fusion ({a}, {b}) names {name!r}, which is not among the models {sorted(models)}"
                )
    nets = {}
    for name, state in models.items():
        net = build_transunet(cfg.model.model_copy(update={"checkpoint": None}), num_classes=1)
        net.load_state_dict(state)
        net.to(device).eval()
        if cfg.runtime.channels_last:
            net.to(memory_format=torch.channels_last)
        nets[name] = net
    fcfg = cfg.fusion
    scores: dict[str, list[float]] = {}
    videos: list[str] = []
    empty = 0
    fig_cache: dict[str, Any] | None = None
    loader = DataLoader(
        ds, batch_size=min(32, len(ds)), shuffle=False, num_workers=cfg.runtime.num_workers
    )
    t0 = time.perf_counter()
    for batch in loader:
        batch = to_device(batch, device, cfg.runtime.channels_last)
        gt = batch["mask"] > 0.5
        empty += int((gt.flatten(1).sum(1) == 0).sum())
        videos += [
            f"{p}/{v}" for p, v in zip(batch["patient"], batch["video"].tolist(), strict=True)
        ]
        probs: dict[str, torch.Tensor] = {}
        with autocast(device, cfg.runtime.bf16):
            for name, net in nets.items():
                probs[name] = torch.sigmoid(net(batch["image"]).float())
        weights: dict[str, torch.Tensor] = {}
        for j, pair in enumerate(fusions):
            for mode in fcfg.modes:
                fname = fusion_name(mode, tuple(pair), j == 0)
                probs[fname], weights[fname] = fuse(
                    probs[pair[0]], probs[pair[1]], mode, fcfg.normalize, fcfg.eps
                )
        for name, p in probs.items():
            d, i = dice_iou(p >= fcfg.threshold, gt)
            scores.setdefault(f"{name}/dice", []).extend(d.tolist())
            scores.setdefault(f"{name}/iou", []).extend(i.tolist())
        if fig_cache is None:  # the main pair's fusions and single models (a study has dozens)
            fig_cache = {
                "image": batch["image"][:6].cpu(),
                "gt": gt[:6].cpu(),
                "probs": {k: v[:6].cpu() for k, v in probs.items() if "[" not in k},
                "weights": {k: v[:6].cpu() for k, v in weights.items() if "[" not in k},
            }
    seconds = time.perf_counter() - t0
    n = len(ds)
    metrics: dict[str, float] = {k: float(np.mean(v)) for k, v in scores.items()}
    order = list(dict.fromkeys(videos))
    patients = [v.rsplit("/", 1)[0] for v in videos]
    per_video = {k: list(group_means(v, videos).values()) for k, v in scores.items()}
    per_patient = {k: list(group_means(v, patients).values()) for k, v in scores.items()}
    metrics.update(
        {
            "n_images": float(n),
            "n_empty_gt": float(empty),
            "n_videos": float(len(order)),
            "n_patients": float(len(set(patients))),
            "seconds": seconds,
            "frames_per_s": n / max(seconds, 1e-9),
        }
    )
    if fig_cache is not None:
        try:
            from common.figures import fusion_weight_figure, overlay_figure

            figs = out_dir / "figures"
            figs.mkdir(parents=True, exist_ok=True)
            overlay_figure(
                fig_cache["image"],
                fig_cache["gt"],
                fig_cache["probs"],
                figs / f"overlays_{split}.png",
                fcfg.threshold,
            )
            if fig_cache["weights"]:
                fusion_weight_figure(
                    fig_cache["image"],
                    fig_cache["probs"],
                    fig_cache["weights"],
                    figs / f"fusion_weights_{split}.png",
                )
        except ImportError:  # pragma: no cover - figures are a bonus, never a failure
            pass
    if progress:
        best = max((k for k in metrics if k.endswith("/dice")), key=metrics.get, default=None)
        print(
            f"[evaluate:{site.name}:{split}] {n} frames, {len(order)} videos, {seconds:.1f}s; best {best} = {metrics.get(best, float('nan')):.4f}",
            flush=True,
        )
    return EvalResult(metrics, scores, per_video, n, per_patient)
