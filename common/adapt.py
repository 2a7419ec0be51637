"""Beyond the paper: the target site adapts the fine-tuned pair to its own unlabeled frames
(docs/method.md, "Adapting at the target").

The paper uses the target's frames only for pretraining; the decoders never see one. After
fine-tuning, the target holds the pair and the fusion's per-pixel confidence, and thousands of
unlabeled frames. Two label-free objectives from the source-free adaptation literature, one config
key (``adapt.method``):

- ``self-training``: a teacher pair that follows the students slowly (an exponential moving
  average, so a wrong pseudo-label does not feed on itself) fuses its two predictions on the plain
  frame; the fused mask is the pseudo-label and the fusion's confidence, 1 − H(p)/ln 2, each pixel's
  weight. Both students learn it with DiceBCE on a strongly augmented view of the same frame (a
  consistency term: the prediction must not depend on blur, speckle or contrast). The zero padding
  that makes a frame square, and ``adapt.edge_px`` pixels into the frame from it, are background
  with full weight (``adapt.padding_prior``): there is no tissue there, which each frame's size
  tells without a label, and the bright-over-dark step at the padding's edge is what the
  source-trained models mistake for a bone surface — self-training without this prior learns that
  mistake (docs/results.md). The teacher is what the site keeps.
- ``tent``: each branch minimises the entropy of its own prediction, on its normalisation layers'
  affine parameters only (TENT); batch-norm layers re-estimate their statistics on the target's
  frames and keep them for inference (a bedside frame at batch 1 must not depend on its batch).

Nothing here reads a label: the budget is fixed (``adapt.optim``), and the signals reported before
and after — the fused prediction's mean entropy, the two branches' agreement, the foreground share —
are computed from predictions alone, on the first ``adapt.health_frames`` train frames.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import arms
from common.config import ExperimentConfig
from common.engine import Step, fit, make_optimizer
from common.fusion import confidence, fuse
from common.losses import binary_entropy, weighted_dice_bce
from common.stages import fit_kwargs, load_models, make_loader, seed_everything, setup_device

NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class AdaptResult:
    """The adapted pair (keyed by ``arms.ADAPTED_PAIR``; it stays at the site) and the scalars that
    may cross: budget, wall time, label-free signals before and after."""

    states: dict[str, dict[str, torch.Tensor]]
    metrics: dict[str, float]
    num_examples: int


class MeanTeacherPair(nn.Module):
    """Two students and their EMA teacher. ``train()`` leaves the teacher in eval mode (its
    batch-norm statistics move with the students', by the same average, not with each batch)."""

    def __init__(self, nets: dict[str, nn.Module], momentum: float):
        super().__init__()
        self.students = nn.ModuleDict(nets)
        self.teacher = copy.deepcopy(self.students).requires_grad_(False)
        self.momentum = momentum

    def train(self, mode: bool = True) -> MeanTeacherPair:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher ← m·teacher + (1 − m)·student, parameters and floating buffers alike."""
        t_state, s_state = self.teacher.state_dict(), self.students.state_dict()
        for k, t in t_state.items():
            if t.is_floating_point():
                t.lerp_(s_state[k], 1 - self.momentum)
            else:
                t.copy_(s_state[k])


def self_training_step(pair: MeanTeacherPair, cfg: ExperimentConfig) -> Step:
    """Confidence-weighted pseudo-labels from the teacher's fusion on ``image``, learnt by each
    student on ``strong`` (or ``image`` when ``adapt.strong_view`` is off)."""
    acfg, fcfg = cfg.adapt, cfg.fusion
    g, c = arms.MAIN_PAIR

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # the previous optimiser step has moved the students: the teacher follows (no-op at first)
        pair.update_teacher()
        with torch.no_grad():
            x = batch["image"]
            p_g, p_c = (torch.sigmoid(pair.teacher[b](x).float()) for b in (g, c))
            p, _ = fuse(p_g, p_c, fcfg.default_mode, fcfg.normalize, fcfg.eps)
            target = (p >= fcfg.threshold).float()
            weight = confidence(p, "entropy")
            weight = weight * (weight >= acfg.min_confidence)
            if acfg.padding_prior:  # no tissue outside the acquired frame: background, trusted
                outside = batch["outside"]
                target, weight = target * (1 - outside), torch.maximum(weight, outside)
        view = batch["strong"] if acfg.strong_view else batch["image"]
        loss = sum(weighted_dice_bce(pair.students[b](view), target, weight) for b in (g, c))
        return {"loss": loss, "pseudo_foreground": target.mean(), "mean_weight": weight.mean()}

    return step


def tent_parameters(nets: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every normalisation layer; everything else is frozen."""
    nets.requires_grad_(False)
    params = []
    for m in nets.modules():
        if isinstance(m, NORMS):
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def tent_step(nets: nn.ModuleDict) -> Step:
    """Mean per-pixel binary entropy of each branch's own prediction, summed over the branches."""

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        loss = sum(binary_entropy(torch.sigmoid(nets[b](x).float())).mean() for b in nets)
        return {"loss": loss / math.log(2)}  # in bits per pixel: 1 = a coin flip everywhere

    return step


@torch.no_grad()
def health(cfg: ExperimentConfig, nets: dict[str, nn.Module], images: torch.Tensor, device):
    """Label-free signals of the fused pair on ``images``: the fused prediction's mean entropy
    (bits per pixel), the branches' agreement (Dice of their two masks, mean per frame; 1 when both
    are empty) and the fused foreground share."""
    fcfg = cfg.fusion
    was = {b: n.training for b, n in nets.items()}
    for n in nets.values():
        n.eval()
    g, c = arms.MAIN_PAIR
    ent, agree, fg, n_img = 0.0, 0.0, 0.0, 0
    for x in images.split(32):
        x = x.to(device)
        p_g, p_c = (torch.sigmoid(nets[b](x).float()) for b in (g, c))
        p, _ = fuse(p_g, p_c, fcfg.default_mode, fcfg.normalize, fcfg.eps)
        m_g, m_c = (q >= fcfg.threshold for q in (p_g, p_c))
        inter = (m_g & m_c).flatten(1).sum(1).float()
        total = (m_g.flatten(1).sum(1) + m_c.flatten(1).sum(1)).float()
        dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
        ent += float(binary_entropy(p).mean(dim=(1, 2, 3)).sum()) / math.log(2)
        agree += float(dice.sum())
        fg += float((p >= fcfg.threshold).float().mean(dim=(1, 2, 3)).sum())
        n_img += x.shape[0]
    for b, n in nets.items():
        n.train(was[b])
    return {"entropy": ent / n_img, "agreement": agree / n_img, "foreground": fg / n_img}


def adapt(
    cfg: ExperimentConfig,
    site,
    out_dir: Path,
    models: dict[str, dict[str, torch.Tensor]],
    progress: bool = True,
) -> AdaptResult:
    """Adapt the main pair (``models`` holds ``arms.MAIN_PAIR``) on the site's train frames with
    ``cfg.adapt.method``; the loss curve (``loss.png``, ``history.json``) goes to ``out_dir``.

    Raises:
        ValueError: ``adapt.method`` is "none", the pair is incomplete, or the site has no train
            frames.
    """
    from common.data.datasets import StrongViewDataset

    acfg = cfg.adapt
    if acfg.method == "none":
        raise ValueError("adapt.method is 'none': there is nothing to adapt")
    missing = [b for b in arms.MAIN_PAIR if b not in models]
    if missing:
        raise ValueError(f"the adapt phase needs the main pair {arms.MAIN_PAIR}; missing {missing}")
    device = setup_device(cfg)
    gen = seed_everything(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = StrongViewDataset(site, "train", cfg.model.img_size, seed=cfg.seed, margin=acfg.edge_px)
    if len(ds) == 0:
        raise ValueError(f"site {site.name!r} has no train frames to adapt on")
    nets = load_models(cfg, {b: models[b] for b in arms.MAIN_PAIR}, device)
    probe = torch.stack([ds[i]["image"] for i in range(min(acfg.health_frames, len(ds)))])
    before = health(cfg, nets, probe, device)
    if acfg.method == "self-training":
        module: nn.Module = MeanTeacherPair(nets, acfg.ema)
        step, params = self_training_step(module, cfg), list(module.students.parameters())
    else:
        module = nn.ModuleDict(nets)
        step, params = tent_step(module), tent_parameters(module)
    opt = make_optimizer(params, acfg.optim)
    phase = f"adapt:{acfg.method}"
    res = fit(
        module, step, make_loader(ds, acfg.optim.batch_size, cfg, gen), opt,
        **fit_kwargs(cfg, acfg.optim, device, phase, out_dir, progress),
    )  # fmt: skip
    if isinstance(module, MeanTeacherPair):
        module.update_teacher()  # the last step's update, then the teacher is what is kept
        kept = dict(module.teacher.items())
    else:
        kept = dict(module.items())
    after = health(cfg, kept, probe, device)
    metrics = res.metrics()
    for name, v in before.items():
        metrics[f"{name}_before"], metrics[f"{name}_after"] = v, after[name]
    states = {
        adapted: {k: v.detach().cpu().clone() for k, v in kept[b].state_dict().items()}
        for b, adapted in zip(arms.MAIN_PAIR, arms.ADAPTED_PAIR, strict=True)
    }
    if progress:
        print(
            f"[{phase}:{site.name}] {len(ds)} unlabeled frames, {int(metrics['steps'])} steps, "
            f"{metrics['seconds']:.1f}s; fused entropy {before['entropy']:.3f} → "
            f"{after['entropy']:.3f} bits/px, branch agreement {before['agreement']:.3f} → "
            f"{after['agreement']:.3f}",
            flush=True,
        )
    return AdaptResult(states, metrics, len(ds))


def pair_digest(models: dict[str, dict[str, torch.Tensor]]) -> str:
    """A digest of the main pair's weights: which fine-tuned pair an adapted one came from."""
    import hashlib

    h = hashlib.sha256()
    for b in arms.MAIN_PAIR:
        for k in sorted(models[b]):
            t = models[b][k].detach().cpu().contiguous()
            h.update(f"{b}.{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
