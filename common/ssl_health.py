"""Is self-supervised pretraining learning? Signals a target site can read without a single label.

A pretraining loss alone does not say: an NT-Xent loss of 4.14 is healthy at one batch size and
means "all embeddings are equal" at another, and a SimMIM loss of 0.1 may be no better than
painting every masked pixel grey. So each pretraining step also logs, from the batch it trained on:

Contrastive branches (MT-NXent, SimCLR), from the projections both views make:
- ``ssl_collapse_loss``: the loss when every similarity is equal (collapsed or untrained
  embeddings): the mean over rows of ln(terms in the row's denominator), ln(2B − 1) for SimCLR.
- ``ssl_std``: the std of the L2-normalised embeddings per dimension, averaged, times √d: about 1
  when they spread like points drawn uniformly on the sphere, 0 when collapsed.
- ``ssl_rank``: effective rank (exp of the entropy of the normalised singular values, RankMe) of
  the centred embeddings: how many directions they use; 1 is a dimensional collapse, 0 a point.
- ``ssl_alignment``: mean squared distance between a frame's two views (Wang & Isola 2020, α = 2):
  0 = views agree.
- ``ssl_uniformity``: log of the mean Gaussian potential exp(−2‖a − b‖²) over all pairs of
  embeddings (t = 2): 0 when collapsed, more negative when spread.

SimMIM, from the masked pixels:
- ``ssl_mean_l1``: the masked L1 of predicting each image's mean (per channel) everywhere; the
  masked L1 must fall below it for the reconstruction to have learned anything.

``summary`` turns a stage's history into the scalars its reply carries (means of the last steps,
like ``train_loss``) and ``verdict`` into what the report flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.losses import masked_l1

CONTRASTIVE_SIGNALS = ("ssl_collapse_loss", "ssl_std", "ssl_rank", "ssl_alignment",
                       "ssl_uniformity")  # fmt: skip
SIMMIM_SIGNALS = ("ssl_mean_l1",)
SIGNALS = CONTRASTIVE_SIGNALS + SIMMIM_SIGNALS
LOSS_RATIO = "ssl_loss_ratio"  # train loss / its collapse (or predict-the-mean) value
LAST_STEPS = 10  # the reply's figures are means over the last steps, like train_loss

# what the report calls collapsed or not learning (docs/method.md, "Is SSL learning?")
NEAR_COLLAPSE = 0.98  # loss ratio at or above: no better than collapsed / predicting the mean
MIN_STD, MIN_RANK = 0.1, 1.5


@torch.no_grad()
def contrastive_signals(
    z_i: torch.Tensor, z_j: torch.Tensor, denominator_terms: torch.Tensor
) -> dict[str, float]:
    """The contrastive signals of one batch: ``z_i``, ``z_j`` (B, d) projections of the two views
    (any scale), ``denominator_terms`` (2B,) how many logits each row's softmax has."""
    with torch.autocast(z_i.device.type, enabled=False):  # float64 throughout, even under bf16
        return _contrastive_signals(z_i.detach(), z_j.detach(), denominator_terms)


def _contrastive_signals(z_i, z_j, denominator_terms) -> dict[str, float]:
    zi, zj = F.normalize(z_i.double(), dim=1), F.normalize(z_j.double(), dim=1)
    z = torch.cat([zi, zj])
    d = z.shape[1]
    singular = torch.linalg.svdvals(z - z.mean(0))
    p = singular / singular.sum().clamp_min(1e-300)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    # all embeddings one point (no singular mass): no direction at all
    rank = torch.where(singular.sum() > 1e-8, entropy.exp(), torch.zeros_like(entropy))
    values = torch.stack([  # one device-to-host copy for all of them (a sync on a GPU)
        denominator_terms.to(z.device).double().log().mean(),
        z.std(dim=0).mean() * math.sqrt(d),
        rank,
        (zi - zj).pow(2).sum(1).mean(),
        torch.pdist(z).pow(2).mul(-2).exp().mean().log(),
    ]).tolist()  # fmt: skip
    return dict(zip(CONTRASTIVE_SIGNALS, values, strict=True))


@torch.no_grad()
def simmim_signals(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """SimMIM's reference: the masked L1 of predicting each image's per-channel mean."""
    with torch.autocast(x.device.type, enabled=False):
        mean = x.float().mean(dim=(2, 3), keepdim=True).expand_as(x)
        return {"ssl_mean_l1": float(masked_l1(mean, x.float(), mask))}


def summary(history: Sequence[Mapping[str, float]], last: int = LAST_STEPS) -> dict[str, float]:
    """The signals a stage reports: each one's mean over the ``last`` steps, and the loss over
    its collapse (contrastive) or predict-the-mean (SimMIM) value over the same steps."""
    tail = [h for h in history if "loss" in h][-last:]
    out = {}
    for name in SIGNALS:
        values = [h[name] for h in tail if name in h]
        if values:
            out[name] = sum(values) / len(values)
    reference = out.get("ssl_collapse_loss", out.get("ssl_mean_l1"))
    if tail and reference:
        out[LOSS_RATIO] = sum(h["loss"] for h in tail) / len(tail) / reference
    return out


def verdict(metrics: Mapping[str, float]) -> str:
    """What the signals say, in words: "learning", or why not ("" without signals)."""
    ratio = metrics.get(LOSS_RATIO)
    if ratio is None:
        return ""
    contrastive = "ssl_collapse_loss" in metrics
    if contrastive and metrics.get("ssl_std", 1.0) < MIN_STD:
        return "collapsed (embeddings have no spread)"
    if contrastive and metrics.get("ssl_rank", MIN_RANK) < MIN_RANK:
        return "collapsed (embeddings use one direction)"
    if ratio >= NEAR_COLLAPSE:
        return (
            "not learning (loss at its collapse value)"
            if contrastive
            else "not learning (no better than predicting the mean)"
        )
    return "learning"


def plot_signals(history: Sequence[Mapping[str, Any]], out_dir: Path, phase: str) -> Path | None:
    """``ssl_health.png`` beside the stage's loss curve: the loss against its reference, and
    each signal per step; None when the history has no signals."""
    steps = [h for h in history if any(k in h for k in SIGNALS)]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SIGNALS if n in steps[0] and n not in ("ssl_collapse_loss", "ssl_mean_l1")]
    reference = "ssl_collapse_loss" if "ssl_collapse_loss" in steps[0] else "ssl_mean_l1"
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 2.8), dpi=100)
    axes = list(axes) if len(names) else [axes]
    x = [h["step"] for h in steps]
    axes[0].plot(x, [h["loss"] for h in steps], lw=0.8, label="loss")
    ref_label = "collapse value" if reference == "ssl_collapse_loss" else "predict the mean"
    axes[0].plot(x, [h[reference] for h in steps], "--", lw=0.8, label=ref_label)
    axes[0].set_title(phase, fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, name in zip(axes[1:], names, strict=True):
        ax.plot(x, [h[name] for h in steps], lw=0.8)
        ax.set_title(name.removeprefix("ssl_"), fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "ssl_health.png"
    fig.savefig(path)
    plt.close(fig)
    return path
