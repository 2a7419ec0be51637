"""Preprocessing as the models see it (``docs/method.md``, "Data as the models see it"), and
augmentations.

Frames: pad to square with zeros at the bottom and right, resize bilinearly to the model size,
scale to [0, 1], no normalisation, replicate to 3 channels. Masks: any label ≥ 1 is bone, resized
nearest → (1, S, S) float {0, 1}. Augmentations are plain torch with explicit ``torch.Generator``s
so a sample's views are reproducible from (seed, epoch, index).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ContrastiveConfig


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """(H, W) → (M, M), M = max(H, W), zeros added at the bottom and right."""
    if img.ndim != 2:
        raise ValueError(f"pad_to_square expects a 2-D (H, W) array, got shape {img.shape}")
    h, w = img.shape
    m = max(h, w)
    if h == w:
        return img
    out = np.zeros((m, m), dtype=img.dtype)
    out[:h, :w] = img
    return out


def resize_gray_u8(img: np.ndarray, size: int) -> np.ndarray:
    """Pad a uint8 (H, W) frame to square and resize bilinearly to (size, size) uint8.

    This is the cacheable part of the preprocessing (what the authors' cv2 pipeline keeps too).
    """
    sq = pad_to_square(np.asarray(img))
    if sq.shape[0] == size:
        return sq.astype(np.uint8, copy=False)
    t = torch.from_numpy(sq.astype(np.float32))[None, None]
    r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return r[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def outside_frame(h: int, w: int, size: int, margin: int = 0) -> torch.Tensor:
    """(1, size, size) float mask of the model-input pixels that did not come from an (h, w) frame
    — the zero padding :func:`pad_to_square` adds at the bottom and right — grown ``margin`` pixels
    into the frame (the bright-over-dark step at the padding's edge looks like a bone surface)."""
    m = max(h, w)
    rows, cols = int(h * size // m), int(w * size // m)  # fully inside the resized frame
    rows -= margin if rows < size else 0  # grown only on a side that has padding
    cols -= margin if cols < size else 0
    out = torch.ones(1, size, size)
    out[:, : max(rows, 0), : max(cols, 0)] = 0.0
    return out


def to_model_image(gray_u8: np.ndarray) -> torch.Tensor:
    """(S, S) uint8 → (3, S, S) float32 in [0, 1] (no mean/std normalisation)."""
    t = torch.from_numpy(np.ascontiguousarray(gray_u8)).to(torch.float32).div_(255.0)
    return t[None].expand(3, -1, -1).contiguous()


def preprocess_image(img: np.ndarray, size: int) -> torch.Tensor:
    """Grey uint8 (H, W) frame → (3, size, size) float32 in [0, 1]."""
    return to_model_image(resize_gray_u8(img, size))


def preprocess_mask(labels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 label map (H, W) → (1, size, size) float32 in {0, 1} (any label ≥ 1 is bone)."""
    sq = pad_to_square((np.asarray(labels) >= 1).astype(np.uint8))
    t = torch.from_numpy(sq)[None, None].to(torch.float32)
    if sq.shape[0] != size:
        t = F.interpolate(t, size=(size, size), mode="nearest-exact")
    return t[0]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_resized_crop_box(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width), drawn from ``g``."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        ar = math.exp(_uniform(g, *log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h  # fallback: centre crop
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def color_jitter(img: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness = contrast = saturation = strength) in random order (torchvision)."""
    lo, hi = max(0.0, 1 - strength), 1 + strength
    for op in torch.randperm(3, generator=g).tolist():
        f = _uniform(g, lo, hi)
        if op == 0:
            img = img * f
        elif op == 1:
            img = f * img + (1 - f) * _gray(img).mean()
        else:
            img = f * img + (1 - f) * _gray(img)
        img = img.clamp(0.0, 1.0)
    return img


class ContrastiveAugment:
    """One contrastive view: RandomResizedCrop → horizontal flip → ColorJitter with p = jitter_p.

    Input and output: (3, S, S) float32 in [0, 1]. Parameters from :class:`ContrastiveConfig`.
    """

    def __init__(self, cfg: ContrastiveConfig, size: int):
        self.cfg = cfg
        self.size = size

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = self.cfg
        _, h, w = img.shape
        top, left, ch, cw = random_resized_crop_box(h, w, c.crop_scale, c.crop_ratio, g)
        crop = img[:, top : top + ch, left : left + cw][None]
        out = F.interpolate(
            crop, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        if float(torch.rand((), generator=g)) < 0.5:
            out = out.flip(-1)
        if c.jitter > 0 and float(torch.rand((), generator=g)) < c.jitter_p:
            out = color_jitter(out, c.jitter, g)
        return out.clamp(0.0, 1.0).contiguous()


def contrastive_views(
    img: torch.Tensor, aug: ContrastiveAugment, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of one (3, S, S) image; view 1 stays plain unless ``augment_both_views``."""
    v1 = aug(img, g) if aug.cfg.augment_both_views else img.clone()
    v2 = aug(img, g)
    return v1, v2


def strong_augment(
    img: torch.Tensor, mask: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strong appearance augmentation for supervised fine-tuning (source-only baseline option).

    Horizontal flip (image and mask), then each with p = 0.5: Gaussian blur, speckle-like
    multiplicative noise, γ, contrast. Shapes: image (3, S, S) in [0, 1], mask (1, S, S).
    """
    if float(torch.rand((), generator=g)) < 0.5:
        img, mask = img.flip(-1), mask.flip(-1)
    return appearance_augment(img, g), mask.contiguous()


def appearance_augment(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each with p = 0.5: Gaussian blur, speckle-like multiplicative noise, γ, contrast — no
    geometry, so a pixel keeps its place (the adapt phase's strong view of a frame whose pseudo-label
    comes from the plain one). Image (3, S, S) in [0, 1]."""
    x = img[:1]
    if float(torch.rand((), generator=g)) < 0.5:  # blur
        sigma = _uniform(g, 0.3, 1.5)
        r = max(1, int(math.ceil(2.5 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        x = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))[0]
    if float(torch.rand((), generator=g)) < 0.5:  # speckle-like multiplicative noise
        s = _uniform(g, 0.05, 0.3)
        n = torch.randn(x.shape, generator=g)
        x = x * (1 + s * n)
    x = x.clamp(0.0, 1.0)
    if float(torch.rand((), generator=g)) < 0.5:  # gamma
        x = x.pow(_uniform(g, 0.6, 1.6))
    if float(torch.rand((), generator=g)) < 0.5:  # contrast
        f = _uniform(g, 0.6, 1.4)
        x = f * x + (1 - f) * x.mean()
    x = x.clamp(0.0, 1.0)
    return x.expand(3, -1, -1).contiguous()


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample, the same whatever the DataLoader worker that draws it."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index & 0x7FFF_FFFF_FFFF_FFFF)
    return g
