"""Torch datasets over a canonical site (each item a dict of tensors).

Frames are decoded once and cached in memory as the padded, resized (S, S) uint8 image (they are
small: 224² = 49 KB), so PNG decoding does not dominate training. Decoding errors surface as
:class:`DataError` naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.config import ContrastiveConfig
from common.data.manifest import DataError, FrameRow, SiteData, load_site
from common.data.transforms import (
    ContrastiveAugment,
    appearance_augment,
    outside_frame,
    contrastive_views,
    preprocess_mask,
    resize_gray_u8,
    sample_generator,
    strong_augment,
    to_model_image,
)


def read_png(path: Path, mode: str = "L") -> np.ndarray:
    """Decode an 8-bit image to a (H, W) uint8 array. Raises DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if mode == "L" and im.mode != "L":
                im = im.convert("L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: refusing an oversized image: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or corrupt image: {err}") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.max(initial=0) > 255:
            raise DataError(f"{path}: values above 255 in an 8-bit image")
        arr = arr.astype(np.uint8)
    return arr


def _as_site(site: SiteData | str | Path) -> SiteData:
    return site if isinstance(site, SiteData) else load_site(site)


class FrameDataset(Dataset):
    """Frames of one split → {"image": (3,S,S) float32 in [0,1], "video": int64, "frame": int64}.

    ``split`` None means every split; ``labeled_only`` keeps labeled rows only. The SSL stages use
    this on the target's train split and ignore any labels it has.
    """

    def __init__(
        self,
        site: SiteData | str | Path,
        split: str | None,
        img_size: int,
        labeled_only: bool = False,
        cache: bool = True,
    ):
        self.site = _as_site(site)
        self.rows: list[FrameRow] = self.site.select(split, True if labeled_only else None)
        self.img_size = int(img_size)
        self.cache = cache
        self._img: dict[int, np.ndarray] = {}
        self._video = torch.tensor(
            [self.site.video_index(r.patient_id, r.video_id) for r in self.rows], dtype=torch.int64
        )
        self._frame = torch.tensor([r.frame_index for r in self.rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def video_ids(self) -> list[int]:
        """The video index of each item (for :class:`VideoBatchSampler`)."""
        return self._video.tolist()

    def gray(self, i: int) -> np.ndarray:
        """Item i's padded and resized (S, S) uint8 frame (cached)."""
        if i in self._img:
            return self._img[i]
        g = resize_gray_u8(read_png(self.site.path(self.rows[i].image_path)), self.img_size)
        if self.cache:
            self._img[i] = g
        return g

    def __getitem__(self, i: int) -> dict:
        return {
            "image": to_model_image(self.gray(i)),
            "video": self._video[i],
            "frame": self._frame[i],
        }


class PairDataset(FrameDataset):
    """Two augmented views per frame → {"view1", "view2": (3,S,S), "video", "frame"} (MT-NXent).

    Views are drawn from a generator seeded by (seed, epoch, index); call :meth:`set_epoch`.
    """

    def __init__(
        self,
        site: SiteData | str | Path,
        split: str | None,
        img_size: int,
        contrastive_cfg: ContrastiveConfig,
        seed: int = 0,
        cache: bool = True,
    ):
        super().__init__(site, split, img_size, cache=cache)
        self.aug = ContrastiveAugment(contrastive_cfg, self.img_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        img = to_model_image(self.gray(i))
        v1, v2 = contrastive_views(img, self.aug, sample_generator(self.seed, self.epoch, i))
        return {"view1": v1, "view2": v2, "video": self._video[i], "frame": self._frame[i]}


class StrongViewDataset(FrameDataset):
    """Frames of one split, labels never read → {"image": plain (3,S,S), "strong": the same frame
    appearance-augmented (no geometry: pixels keep their place), "outside": (1,S,S) 1 on the
    padding and within ``margin`` pixels of it (from the frame's size), "video", "frame"}
    (adapt phase)."""

    def __init__(
        self, site: SiteData | str | Path, split: str | None, img_size: int, seed: int,
        margin: int = 0,
    ):  # fmt: skip
        super().__init__(site, split, img_size)
        self.seed, self.epoch, self.margin = seed, 0, margin
        self._outside: dict[tuple[int, int], torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        g = sample_generator(self.seed, self.epoch, i)
        item["strong"] = appearance_augment(item["image"], g)
        hw = read_png_size(self.site.path(self.rows[i].image_path))
        if hw not in self._outside:
            self._outside[hw] = outside_frame(*hw, self.img_size, self.margin)
        item["outside"] = self._outside[hw]
        return item


class SegDataset(FrameDataset):
    """Labeled frames → {"image": (3,S,S), "mask": (1,S,S) {0,1}, "video", "frame", "patient": str}.

    Raises:
        DataError: the split has no labeled frames, or a mask's size differs from its frame's.
    """

    def __init__(
        self,
        site: SiteData | str | Path,
        split: str | None,
        img_size: int,
        augment: bool = False,
        seed: int = 0,
        cache: bool = True,
    ):
        super().__init__(site, split, img_size, labeled_only=True, cache=cache)
        if not self.rows:
            raise DataError(f"{self.site.root}: no labeled frames in split {split!r}")
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._mask: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def mask(self, i: int) -> torch.Tensor:
        if i in self._mask:
            return self._mask[i]
        r = self.rows[i]
        lab = read_png(self.site.path(r.mask_path), mode="raw")
        h, w = read_png_size(self.site.path(r.image_path))
        if lab.shape != (h, w):
            raise DataError(
                f"{self.site.path(r.mask_path)}: mask size {lab.shape[::-1]} != image size {(w, h)}"
            )
        m = preprocess_mask(lab, self.img_size).to(torch.uint8)
        if self.cache:
            self._mask[i] = m
        return m

    def __getitem__(self, i: int) -> dict:
        img = to_model_image(self.gray(i))
        mask = self.mask(i).to(torch.float32)
        if self.augment:
            img, mask = strong_augment(img, mask, sample_generator(self.seed, self.epoch, i))
        return {
            "image": img,
            "mask": mask,
            "video": self._video[i],
            "frame": self._frame[i],
            "patient": self.rows[i].patient_id,
        }


def read_png_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file without decoding it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable or corrupt image: {err}") from None
    return h, w


class VideoBatchSampler(Sampler[list[int]]):
    """Batches made of groups of ``frames_per_video`` frames from one video each.

    Makes the MT-NXent temporal mask matter (``docs/method.md``: random batches rarely hold two
    frames of one video). Each epoch: shuffle each video's frames, cut them into groups, shuffle
    the groups, fill batches of ``batch_size``; frames left over from a video are skipped this
    epoch.
    ``video_ids[i]`` is the video of dataset item i. Deterministic in (seed, epoch).
    """

    def __init__(
        self,
        video_ids: Sequence[int],
        batch_size: int,
        frames_per_video: int,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if batch_size < 1 or frames_per_video < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and frames_per_video ({frames_per_video}) must be >= 1"
            )
        self.video_ids = list(video_ids)
        self.batch_size = batch_size
        self.fpv = min(frames_per_video, batch_size)
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        by: dict[int, list[int]] = {}
        for i, v in enumerate(self.video_ids):
            by.setdefault(int(v), []).append(i)
        self._by_video = [by[k] for k in sorted(by)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _groups(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: list[list[int]] = []
        for idx in self._by_video:
            p = [idx[j] for j in rng.permutation(len(idx))]
            k = self.fpv if len(p) >= self.fpv else len(p)
            groups += [p[s : s + k] for s in range(0, len(p) - k + 1, k)]
        return [groups[j] for j in rng.permutation(len(groups))]

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for grp in self._groups():
            for i in grp:
                batch.append(i)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = sum(len(g) for g in self._groups())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
