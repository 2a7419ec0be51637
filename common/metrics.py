"""Per-image Dice / IoU and the paired Wilcoxon test with the paper's stars (docs/method.md,
"Evaluation and statistics")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import wilcoxon

SCORES = ("dice", "iou")  # every method is scored per image with both (keys "<method>/<score>")


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU with smoothing 1 (empty vs empty = 1).

    Args:
        pred, target: (B, H, W) or (B, 1, H, W) binary masks (bool or {0, 1}).
    Returns:
        dice (B,), iou (B,) as float64: Dice = (2|P∩G| + 1)/(|P| + |G| + 1),
        IoU = (|P∩G| + 1)/(|P∪G| + 1).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    p = pred.reshape(pred.shape[0], -1).bool()
    g = target.reshape(target.shape[0], -1).bool()
    inter = (p & g).sum(1).double()
    ps, gs = p.sum(1).double(), g.sum(1).double()
    union = (p | g).sum(1).double()
    return (2 * inter + 1) / (ps + gs + 1), (inter + 1) / (union + 1)


def stars(p: float) -> str:
    """*** p < 0.001, ** p < 0.01, * p < 0.05, else 'ns'."""
    if not np.isfinite(p):
        return "n/a"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """Two-sided paired Wilcoxon signed-rank test of a vs b (same images, same order).

    Returns (p, stars). All-zero differences give p = 1.0 (no evidence of a difference).
    Raises: ValueError if the lengths differ or fewer than 1 pair is given.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"paired samples must be 1-D of equal length (got {x.shape} and {y.shape})"
        )
    if x.size == 0:
        raise ValueError("paired samples are empty")
    if np.all(x == y):
        return 1.0, stars(1.0)
    p = float(wilcoxon(x, y, alternative="two-sided").pvalue)
    return p, stars(p)


def group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per group label (e.g. per video), in first-seen order."""
    out: dict[str, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        out.setdefault(str(g), []).append(float(v))
    return {g: float(np.mean(vs)) for g, vs in out.items()}
