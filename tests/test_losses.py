"""Losses against slow references written from the method text, plus hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import DiceBCELoss, MTNXentLoss, masked_l1


def slow_mt_nxent(z_i, z_j, video, frame, tau, gap):
    """Row by row from docs/method.md: the denominator drops the diagonal and every same-video pair
    with |Δframe| < gap, across both views, but never the positive (i, i+B)."""
    b = z_i.shape[0]
    z = [F.normalize(v.double(), dim=0) for v in torch.cat([z_i, z_j])]
    n = 2 * b
    total = 0.0
    for a in range(n):
        pos = (a + b) % n
        num = math.exp(float(z[a] @ z[pos]) / tau)
        den = 0.0
        for c in range(n):
            if c == a:
                continue
            same_video = int(video[a % b]) == int(video[c % b])
            near = abs(int(frame[a % b]) - int(frame[c % b])) < gap
            if c != pos and same_video and near:
                continue
            den += math.exp(float(z[a] @ z[c]) / tau)
        total += -math.log(num / den)
    return total / n


def simclr_nt_xent(z_i, z_j, tau):
    """SimCLR's NT-Xent as usually written (only self-similarity removed)."""
    z = F.normalize(torch.cat([z_i, z_j]).double(), dim=1)
    n = z.shape[0]
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    target = (torch.arange(n) + n // 2) % n
    return F.cross_entropy(sim, target).item()


@pytest.mark.parametrize("batch", [2, 5, 12])
@pytest.mark.parametrize("gap", [0, 1, 3, 15])
@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_mt_nxent_equals_slow_loop(batch, gap, tau):
    # few videos so that same-video pairs are common
    g = torch.Generator().manual_seed(batch * 100 + gap)
    z_i, z_j = torch.randn(batch, 8, generator=g), torch.randn(batch, 8, generator=g)
    video = torch.randint(0, 3, (batch,), generator=g)
    frame = torch.randint(0, 20, (batch,), generator=g)
    fast = MTNXentLoss(tau, gap)(z_i.double(), z_j.double(), video, frame).item()
    assert fast == pytest.approx(slow_mt_nxent(z_i, z_j, video, frame, tau, gap), rel=1e-6)


def test_gap_zero_is_plain_nt_xent():
    # every frame from one video, adjacent frames (the case the gap would mask)
    z_i, z_j = torch.randn(6, 4), torch.randn(6, 4)
    video, frame = torch.zeros(6, dtype=torch.long), torch.arange(6)
    got = MTNXentLoss(0.5, 0)(z_i.double(), z_j.double(), video, frame).item()
    assert got == pytest.approx(simclr_nt_xent(z_i, z_j, 0.5), rel=1e-9)


def test_positives_never_masked_and_every_row_keeps_its_positive():
    # all frames of one video within the gap: every negative is excluded
    loss = MTNXentLoss(0.5, 100)
    b = 4
    video, frame = torch.zeros(b, dtype=torch.long), torch.arange(b)
    excluded = loss.exclusion_mask(video, frame)
    # each row keeps exactly its positive; loss is then exactly 0 (-log(1))
    idx = torch.arange(2 * b)
    assert not excluded[idx, (idx + b) % (2 * b)].any()
    assert ((~excluded).sum(1) == 1).all()
    assert loss(torch.randn(b, 3), torch.randn(b, 3), video, frame).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_gap_is_strict():
    # two frames of one video exactly `gap` apart stay as negatives
    loss = MTNXentLoss(0.5, 5)
    ex = loss.exclusion_mask(torch.tensor([0, 0, 0]), torch.tensor([0, 5, 4]))
    # (0,5) kept, (0,4) excluded — in both views
    assert not ex[0, 1] and not ex[0, 4]
    assert ex[0, 2] and ex[0, 5] and not ex[0, 3]  # 3 is the positive of 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite(dtype):
    # large, nearly identical projections — the worst case for exp overflow
    z = torch.randn(8, 16)
    video, frame = torch.zeros(8, dtype=torch.long), torch.arange(8)
    out = MTNXentLoss(0.01, 3)(z.to(dtype), (z + 1e-3).to(dtype), video, frame)
    ref = MTNXentLoss(0.01, 3)(z.double(), (z + 1e-3).double(), video, frame)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), abs=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"min_frame_gap": -1}, "min_frame_gap"),
    ],
)
def test_mt_nxent_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MTNXentLoss(**kwargs)


def test_mt_nxent_refuses_bad_shapes():
    loss = MTNXentLoss()
    with pytest.raises(ValueError, match="z_i"):
        loss(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="video_ids"):
        loss(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(3), torch.zeros(4))


def test_masked_l1_ignores_unmasked_pixels():
    # pred differs from target by 1 on masked pixels and by 100 elsewhere
    target = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    pred = torch.where(mask.bool().expand_as(target), 1.0, 100.0)
    # only the masked error counts: mean over masked pixels × channels
    assert masked_l1(pred, target, mask).item() == pytest.approx(1.0)


def test_masked_l1_hand_case():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 4) / 2)
    with pytest.raises(ValueError, match="no pixel"):
        masked_l1(pred, target, torch.zeros_like(mask))


def test_dice_bce_equals_formula():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    p = torch.sigmoid(logits)
    # hand-written: soft Dice (smooth 1) over the batch + mean BCE
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert DiceBCELoss()(logits, target).item() == pytest.approx((dice + bce).item(), rel=1e-6)


def test_dice_bce_matches_monai():
    # MONAI's DiceCELoss (sigmoid, batch Dice, smooth 1) is the same loss
    from monai.losses import DiceCELoss

    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    ref = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert DiceBCELoss()(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)
