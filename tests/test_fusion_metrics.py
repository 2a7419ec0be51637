"""Fusion modes against hand-computed cases; Dice/IoU on tiny tables; Wilcoxon against scipy."""

import math

import pytest
import torch
from scipy.stats import wilcoxon

from common.fusion import confidence, fuse
from common.metrics import dice_iou, group_means, paired_wilcoxon, stars


def test_confidences_by_hand():
    p = torch.tensor([0.5, 0.9, 1.0, 0.1])
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert confidence(p, "entropy").tolist() == pytest.approx(
        [0.0, 1 - h09, 1.0, 1 - h09], abs=1e-5
    )
    assert confidence(p, "margin").tolist() == pytest.approx([0.0, 0.8, 1.0, 0.8])
    assert confidence(p, "mean").tolist() == [1.0, 1.0, 1.0, 1.0]


def test_fuse_hand_case_margin():
    # one image, two pixels. Pixel 0: g unsure, c sure -> follows c. Pixel 1: the reverse.
    p_g = torch.tensor([[0.5, 1.0]]).view(1, 1, 1, 2)
    p_c = torch.tensor([[0.0, 0.5]]).view(1, 1, 1, 2)
    # margins: g = [0, 1] -> minmax [0, 1]; c = [1, 0] -> [1, 0]
    fused, w = fuse(p_g, p_c, "margin", eps=1e-6)
    assert fused.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-5)
    assert w.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


def test_mean_mode_is_the_average():
    p_g, p_c = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    fused, w = fuse(p_g, p_c, "mean")
    assert torch.allclose(fused, (p_g + p_c) / 2, atol=1e-5)
    assert torch.allclose(w, torch.full_like(w, 0.5), atol=1e-5)


def test_modes_differ_where_they_should():
    # confidences that order differently under entropy and margin after min-max scaling
    p_g = torch.tensor([0.6, 0.95, 0.5, 0.8]).view(1, 1, 2, 2)
    p_c = torch.tensor([0.1, 0.7, 0.99, 0.4]).view(1, 1, 2, 2)
    out = {m: fuse(p_g, p_c, m)[0] for m in ("entropy", "margin", "mean")}
    # all three differ pairwise, and the fusion always lies between the two branches
    assert not torch.allclose(out["entropy"], out["margin"])
    assert not torch.allclose(out["entropy"], out["mean"])
    assert not torch.allclose(out["margin"], out["mean"])
    for f in out.values():
        assert (f >= torch.minimum(p_g, p_c) - 1e-6).all() and (
            f <= torch.maximum(p_g, p_c) + 1e-6
        ).all()


def test_per_image_vs_per_batch_normalisation_differ():
    p_g = torch.stack([torch.full((1, 2, 2), 0.9), torch.tensor([[[0.5, 0.99], [0.7, 0.6]]])])
    p_c = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a, _ = fuse(p_g, p_c, "entropy", normalize="image")
    b, _ = fuse(p_g, p_c, "entropy", normalize="batch")
    assert not torch.allclose(a, b)


def test_fuse_refuses_bad_input():
    with pytest.raises(ValueError, match="mode"):
        fuse(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), "max")
    with pytest.raises(ValueError, match="shape"):
        fuse(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 3))


def test_dice_iou_tiny_tables():
    # image 0: |P|=2,|G|=2,|P∩G|=1; image 1: empty vs empty; image 2: P empty, G 3 pixels
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    gt = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    d, i = dice_iou(pred, gt)
    assert d.tolist() == pytest.approx([(2 * 1 + 1) / (2 + 2 + 1), 1.0, 1 / 4])
    assert i.tolist() == pytest.approx([(1 + 1) / (3 + 1), 1.0, 1 / 4])


def test_wilcoxon_matches_scipy_and_stars():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, generator=g).tolist()
    b = [x + 0.05 + 0.01 * torch.randn(1, generator=g).item() for x in a]
    p, s = paired_wilcoxon(a, b)
    assert p == pytest.approx(wilcoxon(a, b).pvalue)
    assert s == "***"
    assert paired_wilcoxon(a, a) == (1.0, "ns")
    assert [stars(x) for x in (0.0005, 0.005, 0.03, 0.2)] == ["***", "**", "*", "ns"]
    with pytest.raises(ValueError, match="equal length"):
        paired_wilcoxon([1, 2], [1])


def test_group_means():
    assert group_means([1, 3, 5, 7], ["a", "a", "b", "b"]) == {"a": 2.0, "b": 6.0}
