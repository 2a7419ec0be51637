"""The paper's three stages as framework-free functions: pretrain (SimMIM | MT-NXent | SimCLR),
fine-tune (DiceBCE, best by source-validation loss) and evaluate (single models + fusion).

Each takes the typed experiment config, one site's data and that site's own output folder, and
returns only what may leave the site: weights and scalars (plus per-image score vectors). Everything
else — checkpoints, loss curves, fusion-weight maps, prediction overlays — is written under
``out_dir``. The federated clients and the in-process runner call these same functions.
"""

from __future__ import annotations

import functools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from common import arms, distributed, ssl_health
from common.config import ExperimentConfig, SimMIMConfig, finetune_seed
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
from common.resume import FILENAME, Resumable, fit_key

if TYPE_CHECKING:
    from common.data.manifest import SiteData


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


def setup_device(cfg: ExperimentConfig) -> torch.device:
    """The stage's device (``cuda:r`` for rank r of a multi-process stage on GPUs) and CPU threads
    (a multi-process stage on CPUs shares them out between its ranks)."""
    world = distributed.current().world
    if cfg.runtime.threads or world > 1:
        threads = cfg.runtime.threads or os.cpu_count() or 1
        torch.set_num_threads(max(1, threads // world))
    return distributed.rank_device(cfg.runtime.device)


def _on_device(model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device):
    """``model`` on ``device`` (channels-last if asked), and what a step calls: ``model`` itself,
    or in a multi-process stage ``model`` inside DDP with BatchNorm over the global batch."""
    distributed.sync_batchnorm(model)
    model.to(device)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return distributed.wrap(model, device)


def _spawn(cfg: ExperimentConfig, stage, args: tuple, out_dir: Path, what: str):
    """``stage(*args)`` in ``runtime.world_size`` processes; rank 0's result."""
    return distributed.spawn(
        stage,
        args,
        world_size=cfg.runtime.world_size,
        device=cfg.runtime.device,
        workdir=Path(out_dir),
        what=what,
    )


def make_loader(
    ds,
    batch_size: int,
    cfg: ExperimentConfig,
    gen: torch.Generator,
    shuffle=True,
    drop_last=True,
    batch_sampler=None,
    shard=True,
) -> DataLoader:
    """A loader of ``ds``; in a multi-process stage and with ``shard``, of this rank's share of
    each batch (the batches are the one-process ones: same order, same sizes)."""
    workers = cfg.runtime.num_workers
    common: dict[str, Any] = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": cfg.runtime.device.startswith("cuda"),
    }
    if batch_sampler is None:
        # the batches DataLoader(shuffle=...) draws; its generator also seeds the workers
        bs = min(batch_size, len(ds))
        order = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
        batch_sampler = BatchSampler(order, bs, drop_last=drop_last and len(ds) > bs)
    else:
        gen = None  # the sampler draws its own batches
    rank = distributed.current()
    if shard and rank.world > 1:
        batch_sampler = distributed.ShardedBatches(batch_sampler, rank)
    return DataLoader(ds, batch_sampler=batch_sampler, generator=gen, **common)


def fit_kwargs(
    cfg: ExperimentConfig,
    optim,
    device,
    phase: str,
    out_dir: Path,
    progress: bool,
    resume: Resumable | None = None,
) -> dict[str, Any]:
    return {
        "device": device,
        "epochs": optim.epochs,
        "max_steps": optim.max_steps,
        "warmup_steps": optim.warmup_steps,
        "lr_schedule": optim.lr_schedule,
        "ema_decay": optim.ema_decay,
        "bf16": cfg.runtime.bf16,
        "channels_last": cfg.runtime.channels_last,
        "phase": phase,
        "out_dir": out_dir,
        "progress": progress,
        "resume": resume,
    }


def resumable(
    cfg: ExperimentConfig, out_dir: Path, what, site: SiteData, *generators: torch.Generator
) -> Resumable:
    """The epoch-end checkpoint of the fit of ``what`` (a branch or an arm) on ``site``'s data
    (its manifest's digest) with ``cfg`` in ``out_dir`` (common/resume.py). How the stage runs
    (``runtime``) is not part of what the fit is: a fit stopped on one device goes on on another."""
    from common.data.manifest import data_digest

    setup = cfg.model_dump(mode="json", exclude={"runtime"})
    return Resumable(out_dir / FILENAME, fit_key(setup, what, data_digest(site.root)), generators)


def simmim_step(model: SimMIMModel, scfg: SimMIMConfig, size: int, gen: torch.Generator) -> Step:
    """SimMIM: draw unit masks per sample, zero the masked pixels, reconstruct, masked L1.

    batch["image"]: (B, 3, S, S) in [0, 1].
    """

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        mask = simmim_mask(x.shape[0], size, scfg.mask_patch_size, scfg.mask_ratio, gen, x.device)
        x_in = apply_mask(x, mask, scfg.noise_ratio, scfg.mask_patch_size, gen)
        loss = masked_l1(model(x_in).float(), x, mask)
        return {"loss": loss, **ssl_health.simmim_signals(x, mask)}

    return step


def contrastive_step(
    model: ContrastiveModel, loss_fn: MTNXentLoss, negatives: str = "global"
) -> Step:
    """MT-NXent on two views. batch: view1, view2 (B, 3, S, S); video, frame (B,).

    In a multi-process stage, ``negatives="global"`` gathers every rank's embeddings, videos and
    frame indices, so the loss is the one-process loss of the global batch (the paper's text);
    ``"per-device"`` is each rank's loss of its own share, averaged (the authors' script).
    """

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b = batch["view1"].shape[0]
        # one forward pass over both views: the encoder normalises per sample (GroupNorm/LayerNorm)
        z = model(torch.cat([batch["view1"], batch["view2"]]))
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32 loss under bf16 autocast
        z_i, z_j, video, frame = z[:b], z[b:], batch["video"], batch["frame"]
        if negatives == "global":
            z_i, z_j = distributed.gather_with_grad(z_i), distributed.gather_with_grad(z_j)
            video, frame = distributed.gather(video), distributed.gather(frame)
        loss = loss_fn(z_i, z_j, video, frame)
        terms = loss_fn.denominator_terms(video.to(z.device), frame.to(z.device))
        return {"loss": loss, **ssl_health.contrastive_signals(z_i, z_j, terms)}

    return step


def segmentation_step(model: torch.nn.Module, loss_fn: DiceBCELoss) -> Step:
    """Supervised DiceBCE. batch: image (B, 3, S, S), mask (B, 1, S, S) in {0, 1}. In a
    multi-process stage give ``loss_fn`` ``batch_sum=distributed.all_reduce_sum``: its Dice is
    over the whole batch, so the sums are the global batch's."""

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(model(batch["image"]), batch["mask"])}

    return step


def _simmim_setup(cfg: ExperimentConfig, site: SiteData, gen: torch.Generator):
    """(model, dataset, loader, step builder, optimiser config, generators) of the SimMIM
    branch."""
    from common.data.datasets import FrameDataset

    scfg, size = cfg.simmim, cfg.model.img_size
    model = SimMIMModel(cfg.model)
    ds = FrameDataset(site, "train", size)
    loader = make_loader(ds, scfg.optim.batch_size, cfg, gen)
    # each rank of a multi-process stage draws its own masks (rank 0: the one-process ones)
    masks = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * distributed.current().rank)
    make_step = functools.partial(simmim_step, scfg=scfg, size=size, gen=masks)
    return model, ds, loader, make_step, scfg.optim, (gen, masks)


def _contrastive_setup(cfg: ExperimentConfig, branch: str, site: SiteData, gen: torch.Generator):
    """(model, dataset, loader, step builder, optimiser config, generators) of MT-NXent, or of
    SimCLR (gap 0)."""
    from common.data.datasets import PairDataset, VideoBatchSampler

    ccfg = cfg.contrastive
    if branch == arms.SIMCLR:
        ccfg = ccfg.model_copy(update={"min_frame_gap": 0})
    optim = ccfg.optim
    model = ContrastiveModel(cfg.model)
    ds = PairDataset(site, "train", cfg.model.img_size, ccfg, seed=cfg.seed)
    sampler = None
    if ccfg.sampler == "video":
        sampler = VideoBatchSampler(
            ds.video_ids, min(optim.batch_size, len(ds)), ccfg.frames_per_video, cfg.seed
        )
    loader = make_loader(ds, optim.batch_size, cfg, gen, batch_sampler=sampler)
    loss_fn = MTNXentLoss(ccfg.temperature, ccfg.min_frame_gap)
    make_step = functools.partial(contrastive_step, loss_fn=loss_fn, negatives=ccfg.negatives)
    return model, ds, loader, make_step, optim, (gen,)


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
        DistributedStageError: a rank of a multi-process stage (``runtime.world_size``) failed.
    """
    if branch not in arms.PRETRAIN_BRANCHES:
        raise ValueError(
            f"unknown pretraining branch {branch!r}; expected one of {arms.PRETRAIN_BRANCHES}"
        )
    if distributed.should_spawn(cfg.runtime.world_size):
        args = (cfg, branch, site, out_dir, init_encoder, progress, name)
        return _spawn(cfg, pretrain, args, out_dir, f"pretrain:{name or branch} at {site.name!r}")
    device = setup_device(cfg)
    gen = seed_everything(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if branch == arms.SIMMIM:
        model, ds, loader, make_step, optim, generators = _simmim_setup(cfg, site, gen)
    else:
        model, ds, loader, make_step, optim, generators = _contrastive_setup(cfg, branch, site, gen)
    if len(ds) == 0:
        raise ValueError(f"site {site.name!r} has no train frames to pretrain on")
    if init_encoder is not None:
        load_encoder(model, init_encoder)
    step = make_step(_on_device(model, cfg, device))
    opt = make_optimizer(model.parameters(), optim)
    phase = f"pretrain:{name or branch}"
    resume = resumable(cfg, out_dir, (branch, init_encoder is not None), site, *generators)
    kwargs = fit_kwargs(cfg, optim, device, phase, out_dir, progress, resume)
    res = fit(model, step, loader, opt, **kwargs)
    if distributed.current().main:  # the decoder / projection head stay at the site, never shipped
        torch.save(model.state_dict(), out_dir / "model_local.pt")
        ssl_health.plot_signals(res.history, out_dir, phase)
    metrics = {**res.metrics(), **ssl_health.summary(res.history)}  # is SSL learning? label-free
    return StageResult(encoder_state_dict(model.cpu()), metrics, len(ds))


def _branch_of(arm: str, branch: str | None) -> str:
    """The branch an arm's encoder came from ("" for none); ``None``: a built-in arm's."""
    if branch is not None:
        return branch
    return next((b.name for b in arms.BRANCHES.values() if b.arm == arm), "")


def _weight_decay(cfg: ExperimentConfig, arm: str, branch: str | None) -> float:
    """Arms fine-tuned from a contrastive encoder use ``finetune.weight_decay_contrastive``.
    ``branch`` None: the branch of a built-in arm (``mtnxent`` -> contrastive), else none."""
    branch = _branch_of(arm, branch)
    contrastive = bool(branch) and arms.branch(branch).contrastive
    return cfg.finetune.weight_decay_contrastive if contrastive else cfg.finetune.optim.weight_decay


def _parameter_groups(model: torch.nn.Module, cfg: ExperimentConfig, arm: str, branch):
    """The encoder at ``finetune.encoder_lr_scale`` when it starts pretrained (from a pretraining
    branch, or from ``model.checkpoint``), the rest at the full rate; one group otherwise."""
    scale = cfg.finetune.encoder_lr_scale
    branch = _branch_of(arm, branch)
    pretrained = (bool(branch) and arms.branch(branch).pretrains) or bool(cfg.model.checkpoint)
    if scale == 1 or not pretrained:
        return model.parameters()
    encoder = list(model.encoder.vit.parameters())
    ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": encoder, "lr_scale": scale}, {"params": rest, "lr_scale": 1.0}]


def finetune(
    cfg: ExperimentConfig,
    site: SiteData,
    out_dir: Path,
    encoder: dict[str, torch.Tensor] | None,
    arm: str,
    init_model: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    branch: str | None = None,
) -> StageResult:
    """Supervised TransUNet training on the site's labeled train frames with DiceBCE.

    Only ``encoder`` tensors are loaded into a fresh model (decoder and head random); ``None`` is
    the lower bound (random init, or ``cfg.model.checkpoint`` when set). ``init_model`` (a whole
    model from a previous federated round) takes precedence. ``branch`` is the branch the encoder
    came from (its weight decay: docs/method.md, "Fine-tuning"). The checkpoint with the lowest
    validation DiceBCE is kept and returned; a site without labeled validation frames keeps the
    last one.

    Raises:
        EncoderMismatchError: ``encoder`` does not fit the model.
        ValueError: the site has no labeled train frames.
        DistributedStageError: a rank of a multi-process stage (``runtime.world_size``) failed.
    """
    from common.data.datasets import SegDataset

    if distributed.should_spawn(cfg.runtime.world_size):
        args = (cfg, site, out_dir, encoder, arm, init_model, progress, branch)
        return _spawn(cfg, finetune, args, out_dir, f"finetune:{arm} at {site.name!r}")
    device = setup_device(cfg)
    seed = finetune_seed(cfg.seed, cfg.finetune.repeat)
    gen = seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fcfg, size = cfg.finetune, cfg.model.img_size
    optim = fcfg.optim
    if not site.select(split="train", labeled=True):
        raise ValueError(f"site {site.name!r} has no labeled train frames to fine-tune on")
    train = SegDataset(site, "train", size, augment=fcfg.augment, seed=seed)
    val = SegDataset(site, "val", size) if site.select(split="val", labeled=True) else None
    model = build_transunet(cfg.model, num_classes=1)
    if init_model is not None:
        model.load_state_dict(init_model)
    elif encoder is not None:
        load_encoder(model, encoder)
    net = _on_device(model, cfg, device)
    step = segmentation_step(net, DiceBCELoss(batch_sum=distributed.all_reduce_sum))
    groups = _parameter_groups(model, cfg, arm, branch)
    opt = make_optimizer(groups, optim, weight_decay=_weight_decay(cfg, arm, branch))
    what = (arm, branch, encoder is not None, init_model is not None)
    resume = resumable(cfg, out_dir, what, site, gen)
    val_loader = None
    if val is not None:  # every rank validates the whole set, on its own copy of the weights
        val_loader = make_loader(
            val, optim.batch_size, cfg, gen, shuffle=False, drop_last=False, shard=False
        )
    res = fit(
        model,
        step,
        make_loader(train, optim.batch_size, cfg, gen),
        opt,
        val_loader=val_loader,
        val_every=optim.val_every,
        val_step=segmentation_step(model, DiceBCELoss()),
        **fit_kwargs(cfg, optim, device, f"finetune:{arm}", out_dir, progress, resume),
    )
    metrics = res.metrics()
    metrics["labeled_val_frames"] = float(len(val) if val is not None else 0)
    state = {k: v.detach() for k, v in model.cpu().state_dict().items()}
    return StageResult(state, metrics, len(train))


def _check_fusions(models: dict[str, Any], fusions) -> None:
    for a, b in fusions:
        for name in (a, b):
            if name not in models:
                raise KeyError(
                    f"fusion ({a}, {b}) names {name!r}, which is not among the models "
                    f"{sorted(models)}"
                )


def load_models(
    cfg: ExperimentConfig,
    models: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    share: bool = False,
) -> dict[str, torch.nn.Module]:
    """A TransUNet in eval mode on ``device`` for each state dict (no checkpoint is read).

    ``share``: a float32 state dict becomes the net's own tensors instead of being copied (no
    second copy of big models; only for nets that are never trained, as they would change the
    caller's tensors). Another dtype (a float16 wire) is always copied into float32.
    """
    nets = {}
    for name, state in models.items():
        net = build_transunet(cfg.model.model_copy(update={"checkpoint": None}), num_classes=1)
        own = net.state_dict()
        same = all(state[k].dtype == v.dtype for k, v in own.items() if k in state)
        net.load_state_dict(state, assign=share and same)
        net.to(device).eval()
        if cfg.runtime.channels_last:
            net.to(memory_format=torch.channels_last)
        nets[name] = net
    return nets


def predict(
    cfg: ExperimentConfig,
    nets: dict[str, torch.nn.Module],
    images: torch.Tensor,
    fusions,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Probabilities of every model and of every fusion of ``fusions`` in every mode of
    ``cfg.fusion.modes`` (keyed by method name), and each fusion's weight map (paper Fig. 6)."""
    fcfg = cfg.fusion
    probs: dict[str, torch.Tensor] = {}
    with autocast(device, cfg.runtime.bf16):
        for name, net in nets.items():
            probs[name] = torch.sigmoid(net(images).float())
    weights: dict[str, torch.Tensor] = {}
    for pair in fusions:
        for mode in fcfg.modes:
            name = arms.fusion_name(mode, tuple(pair))
            probs[name], weights[name] = fuse(
                probs[pair[0]], probs[pair[1]], mode, fcfg.normalize, fcfg.eps
            )
    return probs, weights


@dataclass
class _Tally:
    """Scores as they accumulate over batches, in image order."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)  # "<patient>/<video>" per image
    empty: int = 0

    def add(self, probs: dict[str, torch.Tensor], gt: torch.Tensor, batch, threshold: float):
        self.empty += int((gt.flatten(1).sum(1) == 0).sum())
        pairs = zip(batch["patient"], batch["video"].tolist(), strict=True)
        self.videos += [f"{p}/{v}" for p, v in pairs]
        for name, p in probs.items():
            d, i = dice_iou(p >= threshold, gt)
            self.scores.setdefault(f"{name}/dice", []).extend(d.tolist())
            self.scores.setdefault(f"{name}/iou", []).extend(i.tolist())

    def result(self, n: int, seconds: float) -> EvalResult:
        metrics: dict[str, float] = {k: float(np.mean(v)) for k, v in self.scores.items()}
        patients = [v.rsplit("/", 1)[0] for v in self.videos]
        per_video = {k: list(group_means(v, self.videos).values()) for k, v in self.scores.items()}
        per_patient = {k: list(group_means(v, patients).values()) for k, v in self.scores.items()}
        metrics.update(
            {
                "n_images": float(n),
                "n_empty_gt": float(self.empty),
                "n_videos": float(len(set(self.videos))),
                "n_patients": float(len(set(patients))),
                "seconds": seconds,
                "frames_per_s": n / max(seconds, 1e-9),
            }
        )
        return EvalResult(metrics, self.scores, per_video, n, per_patient)


def _write_figures(shown: dict[str, Any], out_dir: Path, split: str, threshold: float) -> None:
    """Prediction overlays (paper Fig. 5) and fusion-weight maps (Fig. 6) of a few frames."""
    try:
        from common.figures import fusion_weight_figure, overlay_figure
    except ImportError:  # pragma: no cover - figures are a bonus, never a failure
        return
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    overlay_figure(
        shown["image"], shown["gt"], shown["probs"], figs / f"overlays_{split}.png", threshold
    )
    if shown["weights"]:
        fusion_weight_figure(
            shown["image"], shown["probs"], shown["weights"], figs / f"fusion_weights_{split}.png"
        )


def _first_frames(batch, gt, probs, weights, names: set[str], k: int = 6) -> dict[str, Any]:
    """The first ``k`` frames of a batch for the figures, single models and the main pair only
    (a study has dozens of fused pairs)."""
    return {
        "image": batch["image"][:k].cpu(),
        "gt": gt[:k].cpu(),
        "probs": {n: v[:k].cpu() for n, v in probs.items() if n in names},
        "weights": {n: v[:k].cpu() for n, v in weights.items() if n in names},
    }


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

    Writes, under ``out_dir/figures``: prediction overlays per method (paper Fig. 5) and
    fusion-weight maps (Fig. 6) for a few frames. Returns means, per-image, per-video and
    per-patient score vectors.

    Raises:
        KeyError: a fusion names a model not in ``models``. ValueError: no labeled frames.
    """
    from common.data.datasets import SegDataset

    device = setup_device(cfg)
    out_dir = Path(out_dir)
    if not site.select(split=split, labeled=True):
        raise ValueError(f"site {site.name!r} has no labeled {split!r} frames to evaluate on")
    ds = SegDataset(site, split, cfg.model.img_size)
    _check_fusions(models, fusions)
    nets = load_models(cfg, models, device, share=True)  # inference only
    shown_names = set(nets) | {arms.fusion_name(m, arms.MAIN_PAIR) for m in cfg.fusion.modes}
    tally, shown = _Tally(), None
    loader = DataLoader(
        ds, batch_size=min(32, len(ds)), shuffle=False, num_workers=cfg.runtime.num_workers
    )
    t0 = time.perf_counter()
    for batch in loader:
        batch = to_device(batch, device, cfg.runtime.channels_last)
        gt = batch["mask"] > 0.5
        probs, weights = predict(cfg, nets, batch["image"], fusions, device)
        tally.add(probs, gt, batch, cfg.fusion.threshold)
        if shown is None:
            shown = _first_frames(batch, gt, probs, weights, shown_names)
    res = tally.result(len(ds), time.perf_counter() - t0)
    if shown is not None:
        _write_figures(shown, out_dir, split, cfg.fusion.threshold)
    if progress:
        m = res.metrics
        best = max((k for k in m if k.endswith("/dice")), key=m.get, default=None)
        print(
            f"[evaluate:{site.name}:{split}] {res.num_examples} frames, {int(m['n_videos'])} "
            f"videos, {m['seconds']:.1f}s; best {best} = {m.get(best, float('nan')):.4f}",
            flush=True,
        )
    return res
