"""Linear CKA (Kornblith et al. 2019): how alike two sets of features of the same inputs are,
invariant to rotation and scale of either. 1 = the same representation up to an orthogonal map and
a scale; near 0 = unrelated. crossprobe uses it to measure how far fine-tuning moved an encoder from
what pretraining learnt (``crossprobe encoder-drift``).
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of ``x`` (n, p) and ``y`` (n, q), features of the same n inputs, in float64:
    ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) after centring each feature.

    Raises:
        ValueError: the two do not describe the same number of inputs, or fewer than two.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(
            f"features {tuple(x.shape)} and {tuple(y.shape)} must be (n, p) and (n, q), n >= 2"
        )
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.t() @ x).pow(2).sum()
    norms = (x.t() @ x).norm() * (y.t() @ y).norm()
    return float(cross / norms) if norms > 0 else 0.0
