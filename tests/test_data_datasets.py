"""Specs for preprocessing, augmentation views, datasets and the video batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import ContrastiveConfig
from common.data.datasets import FrameDataset, PairDataset, SegDataset, VideoBatchSampler
from common.data.manifest import load_site
from common.data.transforms import pad_to_square, preprocess_image, preprocess_mask, strong_augment
from tests.test_data_manifest import make_site


def test_pad_is_zeros_at_bottom_and_right():
    tall = np.full((4, 2), 9, np.uint8)
    wide = np.full((2, 4), 9, np.uint8)
    pt, pw = pad_to_square(tall), pad_to_square(wide)
    assert pt.shape == (4, 4) and (pt[:, :2] == 9).all() and (pt[:, 2:] == 0).all()
    assert pw.shape == (4, 4) and (pw[:2] == 9).all() and (pw[2:] == 0).all()


def test_preprocess_image_shape_range_and_three_equal_channels():
    img = np.full((30, 60), 255, np.uint8)
    x = preprocess_image(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.max() == 1.0 and x.min() == 0.0
    assert x[0, :10].mean() == 1.0 and x[0, -10:].mean() == 0.0  # padding went to the bottom


def test_mask_any_label_is_bone_and_stays_binary():
    lab = np.zeros((40, 40), np.uint8)
    lab[10:20, :] = 1
    lab[20:30, :] = 3
    m = preprocess_mask(lab, 16)
    assert m.shape == (1, 16, 16)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 4:12].all() and not m[0, :3].any()


def test_frame_dataset_items(tmp_path: Path):
    site = load_site(make_site(tmp_path))
    ds = FrameDataset(site, "train", 32)
    item = ds[1]
    assert len(ds) == 3 and item["image"].shape == (3, 32, 32)
    assert item["video"].dtype == torch.int64 and int(item["frame"]) == 1


def test_seg_dataset_items_and_augment(tmp_path: Path):
    site = load_site(make_site(tmp_path))
    ds = SegDataset(site, "test", 32)
    aug = SegDataset(site, "test", 32, augment=True, seed=1)
    item, a = ds[0], aug[0]
    assert item["mask"].shape == (1, 32, 32) and item["patient"] == "p2"
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert (
        a["image"].shape == (3, 32, 32)
        and float(a["image"].min()) >= 0
        and float(a["image"].max()) <= 1
    )
    assert torch.equal(a["mask"], item["mask"]) or torch.equal(a["mask"], item["mask"].flip(-1))


def test_strong_augment_changes_appearance_only_or_flips_both():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 16, 16)
    mask = (torch.rand(1, 16, 16) > 0.5).float()
    outs = [strong_augment(img, mask, g) for _ in range(8)]
    assert any(not torch.equal(o[0], img) for o in outs)
    assert all(torch.equal(m, mask) or torch.equal(m, mask.flip(-1)) for _, m in outs)


def test_pair_views_differ_and_are_reproducible(tmp_path: Path):
    site = load_site(make_site(tmp_path))
    cfg = ContrastiveConfig()
    ds = PairDataset(site, "train", 32, cfg, seed=0)
    a, b = ds[0], ds[0]
    ds.set_epoch(1)
    c = ds[0]
    plain = PairDataset(site, "train", 32, ContrastiveConfig(augment_both_views=False))[0]
    assert a["view1"].shape == a["view2"].shape == (3, 32, 32)
    assert not torch.equal(a["view1"], a["view2"])
    assert torch.equal(a["view1"], b["view1"]) and not torch.equal(a["view1"], c["view1"])
    assert torch.equal(plain["view1"], FrameDataset(site, "train", 32)[0]["image"])


def test_video_batch_sampler_groups_frames_of_one_video():
    vids = [v for v in range(6) for _ in range(10)]
    s = VideoBatchSampler(vids, batch_size=8, frames_per_video=4, seed=0)
    batches = list(s)
    s.set_epoch(1)
    other = list(s)
    assert len(batches) == len(s) > 0 and all(len(b) == 8 for b in batches)
    for b in batches:
        per = np.bincount([vids[i] for i in b])
        assert per.max() >= 4  # several frames of one video in each batch
    assert all(len(set(b)) == 8 for b in batches)
    assert batches != other and list(VideoBatchSampler(vids, 8, 4, seed=0)) == batches
