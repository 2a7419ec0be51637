"""Confidence-aware infusion head (docs/method.md, "Confidence-aware fusion"): fuse two
branches' sigmoid maps pixel by pixel."""

from __future__ import annotations

import math

import torch

MODES = ("entropy", "margin", "mean")


def confidence(p: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-pixel confidence of a probability map p (any shape), in [0, 1].

    entropy: 1 − H(p)/ln 2 with binary entropy H; margin: |2p − 1|; mean: 1.
    Raises: ValueError for an unknown mode.
    """
    if mode == "entropy":
        q = p.clamp(1e-7, 1 - 1e-7)
        h = -(q * q.log() + (1 - q) * (1 - q).log())
        return 1 - h / math.log(2)
    if mode == "margin":
        return (2 * p - 1).abs()
    if mode == "mean":
        return torch.ones_like(p)
    raise ValueError(f"unknown fusion mode {mode!r}; expected one of {MODES}")


def _minmax(c: torch.Tensor, per: str) -> torch.Tensor:
    """Min-max normalise to [0, 1] per image (dims 1..) or over the whole batch.

    A constant map (e.g. mode 'mean') normalises to all ones, so it still carries equal weight.
    """
    if per == "image":
        dims = tuple(range(1, c.dim()))
        lo = c.amin(dim=dims, keepdim=True)
        hi = c.amax(dim=dims, keepdim=True)
    elif per == "batch":
        lo, hi = c.min(), c.max()
    else:
        raise ValueError(f"unknown normalisation {per!r}; expected 'image' or 'batch'")
    span = hi - lo
    return torch.where(span > 0, (c - lo) / span.clamp_min(1e-12), torch.ones_like(c))


def fuse(
    p_g: torch.Tensor,
    p_c: torch.Tensor,
    mode: str = "entropy",
    normalize: str = "image",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the generative (p_g) and contrastive (p_c) branches' probabilities.

    Args:
        p_g, p_c: (B, 1, H, W) or (B, H, W) sigmoid outputs in [0, 1].
        mode: entropy | margin | mean; normalize: per 'image' (the authors' batch of 1) or 'batch'.
    Returns:
        (fused p, weight map c_g / (c_g + c_c + eps)) — both shaped like p_g. The weight map is the
        picture of the paper's Figure 6 (1 = trust the generative branch).
    Raises:
        ValueError: shapes differ, or an unknown mode/normalisation.
    """
    if p_g.shape != p_c.shape:
        raise ValueError(f"p_g {tuple(p_g.shape)} and p_c {tuple(p_c.shape)} must have equal shape")
    c_g = _minmax(confidence(p_g, mode), normalize)
    c_c = _minmax(confidence(p_c, mode), normalize)
    denom = c_g + c_c + eps
    return (c_g * p_g + c_c * p_c) / denom, c_g / denom
