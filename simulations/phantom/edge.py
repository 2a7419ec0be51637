"""How often a model draws bone along the padding edge.

The paper pads each frame with zeros at the bottom and right. Where a frame ends in grey speckle
(the TeleMED-like device's far field), the step down to the padding is bright over dark, which is
what a bone surface over its shadow looks like; a source-trained model may mark it. No label has
bone there, so the share of frames where a model does is a measure of that one failure, and of how
much it varies from seed to seed (docs/results.md, "The noise floor").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.data.datasets import SegDataset, read_png_size
from common.data.transforms import outside_frame


def edge_band(h: int, w: int, size: int, band_px: int) -> torch.Tensor:
    """(size, size) bool: the ``band_px`` model-input pixels inside an (h, w) frame next to its
    zero padding."""
    return (outside_frame(h, w, size, band_px) - outside_frame(h, w, size, 0))[0].bool()


@torch.inference_mode()
def padding_edge_share(
    net: Callable[[torch.Tensor], torch.Tensor],
    ds: SegDataset,
    threshold: float = 0.5,
    band_px: int = 3,
    min_px: int = 5,
    batch_size: int = 32,
) -> float:
    """Share of ``ds``'s frames on which ``net`` (images → logits) calls at least ``min_px`` pixels
    of the edge band bone."""
    bands = [
        edge_band(*read_png_size(ds.site.path(r.image_path)), ds.img_size, band_px) for r in ds.rows
    ]
    hits = 0
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        images = torch.stack([ds[i]["image"] for i in idx])
        bone = torch.sigmoid(net(images))[:, 0] > threshold
        band = torch.stack([bands[i] for i in idx])
        hits += int(((bone & band).flatten(1).sum(1) >= min_px).sum())
    return hits / len(ds)
