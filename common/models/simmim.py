"""SimMIM on TransUNet (docs/method.md, "Branch 1: SimMIM"): mask generator and the
reconstruction model."""

from __future__ import annotations

import math

import torch
from torch import nn

from common.config import ModelConfig
from common.models.transunet import TransUNet


def simmim_mask(
    batch: int,
    img_size: int,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random unit masks, drawn per sample: (B, 1, S, S) float, 1 = masked pixel.

    The image grid is cut into ``mask_patch_size`` px units ((S/32)² = 7×7 at 224) and
    ``ceil(mask_ratio × units)`` of them are masked in every image.

    Raises: ValueError if the unit does not divide the image or the ratio is outside (0, 1).
    """
    if img_size % mask_patch_size:
        raise ValueError(f"mask_patch_size {mask_patch_size} must divide img_size {img_size}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1) (got {mask_ratio})")
    g = img_size // mask_patch_size
    n_mask = math.ceil(mask_ratio * g * g)
    scores = torch.rand(batch, g * g, generator=generator)
    idx = scores.argsort(dim=1)[:, :n_mask]
    units = torch.zeros(batch, g * g)
    units.scatter_(1, idx, 1.0)
    units = units.view(batch, 1, g, g)
    mask = units.repeat_interleave(mask_patch_size, 2).repeat_interleave(mask_patch_size, 3)
    return mask.to(device)


def apply_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    noise_ratio: float = 0.0,
    mask_patch_size: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The masked input: masked pixels set to 0 (no learnable token).

    With ``noise_ratio`` > 0 (the authors' code, not the paper) that share of the masked units keeps
    the image under multiplicative speckle x·(1 + 0.5·n), n ~ N(0, 1), instead of zeros; the loss
    still covers them.
    """
    out = x * (1 - mask)
    if noise_ratio > 0:
        b, _, s, _ = mask.shape
        g = s // mask_patch_size
        pick = (torch.rand(b, 1, g, g, generator=generator) < noise_ratio).to(x.dtype)
        pick = (
            pick.repeat_interleave(mask_patch_size, 2)
            .repeat_interleave(mask_patch_size, 3)
            .to(x.device)
        )
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        noisy = (x * (1 + 0.5 * noise)).clamp(0, 1)
        out = out + noisy * mask * pick
    return out


class SimMIMModel(nn.Module):
    """The whole TransUNet with a 3-channel linear reconstruction head.

    forward(x_masked (B, 3, S, S)) -> reconstruction (B, 3, S, S). Decoder and head stay at the
    target site; only ``encoder`` is handed off.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = TransUNet(cfg, num_classes=3)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x_masked: torch.Tensor) -> torch.Tensor:
        return self.net(x_masked)
