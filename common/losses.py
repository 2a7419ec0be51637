"""Losses of the three stages (docs/method.md): masked L1 (SimMIM), MT-NXent, DiceBCE.

Every loss documents its tensor shapes and raises ``ValueError`` naming a bad argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM reconstruction loss: mean absolute error over masked pixels only.

    Args:
        pred, target: (B, C, H, W) reconstruction and original image.
        mask: (B, 1, H, W) or (B, H, W), 1 where the input pixel was masked.
    Returns:
        scalar = Σ_masked |pred − target| / (number of masked pixels × C).
    Raises:
        ValueError: shapes disagree, or no pixel is masked.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (B, C, H, W)"
        )
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:] or mask.shape[1] != 1:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be (B, 1, H, W) matching pred {tuple(pred.shape)}"
        )
    m = mask.to(pred.dtype)
    denom = m.sum() * pred.shape[1]
    if denom <= 0:
        raise ValueError("mask selects no pixel")
    return ((pred - target).abs() * m).sum() / denom


class MTNXentLoss(nn.Module):
    """MT-NXent: NT-Xent whose denominator excludes temporally adjacent frames of the same video.

    z = [z_i; z_j] (2B × d), s = z zᵀ / τ. Excluded from each row's denominator: the diagonal and
    every (a, b) with the same video and |frame_a − frame_b| < ``min_frame_gap`` (strict), across
    both views — never the positive (i, i+B). Cross-entropy over the 2B rows with the positive as
    target. ``min_frame_gap=0`` is exactly SimCLR's NT-Xent. The excluded logits are filled with the
    dtype's minimum (safe in float16/bfloat16), not a literal −9e15.

    Args to forward:
        z_i, z_j: (B, d) projections of the two views (normalised here, so any scale works).
        video_ids: (B,) integer ids unique per video within the batch's site.
        frame_indices: (B,) frame index within the video.
    Raises:
        ValueError: temperature ≤ 0, gap < 0, shapes that disagree, or B < 2.
    """

    def __init__(self, temperature: float = 0.5, min_frame_gap: int = 15):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        if min_frame_gap < 0:
            raise ValueError(f"min_frame_gap must be >= 0 (got {min_frame_gap})")
        self.temperature = float(temperature)
        self.min_frame_gap = int(min_frame_gap)

    def exclusion_mask(self, video_ids: torch.Tensor, frame_indices: torch.Tensor) -> torch.Tensor:
        """(2B, 2B) bool: True where a pair is left out of the denominator (positives never)."""
        b = video_ids.shape[0]
        v = torch.cat([video_ids, video_ids])
        f = torch.cat([frame_indices, frame_indices]).long()
        near = (v[:, None] == v[None, :]) & ((f[:, None] - f[None, :]).abs() < self.min_frame_gap)
        near |= torch.eye(2 * b, dtype=torch.bool, device=v.device)
        idx = torch.arange(2 * b, device=v.device)
        near[idx, (idx + b) % (2 * b)] = False  # the positive always stays
        return near

    def denominator_terms(
        self, video_ids: torch.Tensor, frame_indices: torch.Tensor
    ) -> torch.Tensor:
        """(2B,) logits in each row's softmax: the positive and the negatives left in. With all
        similarities equal the loss is the mean of their logs (``common/ssl_health.py``)."""
        return (~self.exclusion_mask(video_ids, frame_indices)).sum(1)

    def forward(
        self,
        z_i: torch.Tensor,
        z_j: torch.Tensor,
        video_ids: torch.Tensor,
        frame_indices: torch.Tensor,
    ) -> torch.Tensor:
        if z_i.dim() != 2 or z_i.shape != z_j.shape:
            raise ValueError(
                f"z_i {tuple(z_i.shape)} and z_j {tuple(z_j.shape)} must both be (B, d)"
            )
        b = z_i.shape[0]
        if b < 2:
            raise ValueError(f"batch size must be >= 2 (got {b})")
        if video_ids.shape != (b,) or frame_indices.shape != (b,):
            raise ValueError(
                f"video_ids {tuple(video_ids.shape)} and "
                f"frame_indices {tuple(frame_indices.shape)} must be ({b},)"
            )
        z = F.normalize(torch.cat([z_i, z_j]), dim=1)
        sim = (z @ z.t()) / self.temperature
        excluded = self.exclusion_mask(video_ids.to(z.device), frame_indices.to(z.device))
        sim = sim.masked_fill(excluded, torch.finfo(sim.dtype).min)
        target = (torch.arange(2 * b, device=z.device) + b) % (2 * b)
        # cross-entropy in float32: logsumexp over half-precision logits loses the positive's mass
        if sim.dtype in (torch.float16, torch.bfloat16):
            sim = sim.float()
        return F.cross_entropy(sim, target)


class DiceBCELoss(nn.Module):
    """Soft Dice (smooth = 1, over the whole batch) + BCE from logits.

    forward(logits (B, 1, H, W), target (B, 1, H, W) in {0, 1}) -> scalar
    Dice term = 1 − (2 Σ p·g + 1) / (Σ p + Σ g + 1), p = sigmoid(logits).

    ``batch_sum`` turns this batch's three sums into the whole batch's when the batch is split
    between processes (``common.distributed.all_reduce_sum``); by default they are kept.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0 (got {smooth})")
        self.smooth = smooth
        self.batch_sum = batch_sum

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match"
            )
        logits = logits.float()
        target = target.float()
        p = torch.sigmoid(logits)
        sums = torch.stack([(p * target).sum(), p.sum(), target.sum()])
        if self.batch_sum is not None:
            sums = self.batch_sum(sums)
        inter, p_sum, g_sum = sums
        dice = 1 - (2 * inter + self.smooth) / (p_sum + g_sum + self.smooth)
        return dice + F.binary_cross_entropy_with_logits(logits, target)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary entropy H(p) in nats (0 at p ∈ {0, 1}, ln 2 at p = 0.5)."""
    q = p.float().clamp(1e-7, 1 - 1e-7)
    return -(q * q.log() + (1 - q) * (1 - q).log())


def weighted_dice_bce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """DiceBCE (:class:`DiceBCELoss`) with each pixel counted ``weight`` times: the loss of
    confidence-weighted self-training, where ``target`` is a pseudo-label and ``weight`` how much
    the teacher's fusion trusts it.

    BCE = Σ w·bce / Σ w;  Dice term = 1 − (2 Σ w·p·g + smooth) / (Σ w·p + Σ w·g + smooth), sums over
    the whole batch. All-ones weights give exactly :class:`DiceBCELoss`.
    """
    if not (logits.shape == target.shape == weight.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)}, target {tuple(target.shape)} and weight "
            f"{tuple(weight.shape)} must match"
        )
    logits, target, w = logits.float(), target.float(), weight.float()
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (w * p * target).sum() + smooth) / ((w * p).sum() + (w * target).sum() + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return dice + (w * bce).sum() / w.sum().clamp_min(1e-12)
