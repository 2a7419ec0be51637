"""Site-local pictures: prediction overlays (paper Fig. 5) and fusion-weight maps (Fig. 6).

Written under the site's own output folder only; they show frames and never leave the site.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _gray(img: torch.Tensor):
    return img[0].float().numpy()


def overlay_figure(
    images: torch.Tensor,
    gt: torch.Tensor,
    probs: dict[str, torch.Tensor],
    path: Path,
    threshold: float = 0.5,
) -> None:
    """Rows = frames; columns = ground truth, then each method (prediction contour in red, truth
    in green)."""
    n = images.shape[0]
    cols = ["ground truth", *probs]
    fig, axes = plt.subplots(
        n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), dpi=100, squeeze=False
    )
    for r in range(n):
        g = gt[r, 0].float().numpy()
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(_gray(images[r]), cmap="gray", vmin=0, vmax=1)
            if g.any():
                ax.contour(g, levels=[0.5], colors="lime", linewidths=0.6)
            if name != "ground truth":
                pred = (probs[name][r, 0] >= threshold).float().numpy()
                if pred.any():
                    ax.contour(pred, levels=[0.5], colors="red", linewidths=0.6)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fusion_weight_figure(
    images: torch.Tensor,
    probs: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    path: Path,
) -> None:
    """Rows = frames; columns = image, then each fusion's weight map c_g/(c_g+c_c)
    (1 = generative branch)."""
    n = images.shape[0]
    names = list(weights)
    fig, axes = plt.subplots(
        n, 1 + len(names), figsize=(1.8 * (1 + len(names)), 1.6 * n), dpi=100, squeeze=False
    )
    for r in range(n):
        axes[r, 0].imshow(_gray(images[r]), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_axis_off()
        if r == 0:
            axes[r, 0].set_title("frame", fontsize=6)
        for c, name in enumerate(names, start=1):
            im = axes[r, c].imshow(
                weights[name][r, 0].float().numpy(), cmap="coolwarm", vmin=0, vmax=1
            )
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(f"{name}\nweight of generative", fontsize=6)
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.6)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
