"""Pictures of a study (scores only, no frames): DSC per method over seeds, and per-video DSC of
ours against the lower bound. The frame-level pictures (Fig. 5 overlays, Fig. 6 fusion weights,
loss curves) are written by each site under its own folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import arms
from common.fl import contract


def _dice_panel(ax, site: dict[str, Any], labels: dict[str, str], ours: str, name: str) -> None:
    rows = site["rows"]
    methods = list(rows)[::-1]
    y = np.arange(len(methods))
    means = [rows[m]["dice"] for m in methods]
    sds = [rows[m]["dice_sd"] or 0.0 for m in methods]
    colors = [
        "tab:red" if m == ours else "tab:gray" if m in (arms.LOWER, arms.UPPER) else "tab:blue"
        for m in methods
    ]
    ax.barh(y, means, xerr=sds, color=colors, alpha=0.6, capsize=3)
    for i, m in enumerate(methods):
        seeds = rows[m]["dice_per_seed"]
        ax.scatter(seeds, [i] * len(seeds), color="k", s=10, zorder=3)
    if arms.LOWER in rows and site.get("noise_floor"):
        lo, nf = rows[arms.LOWER]["dice"], site["noise_floor"]
        ax.axvspan(lo - nf, lo + nf, color="orange", alpha=0.25, label="lower bound ± noise floor")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_yticks(y, [labels.get(m, m) for m in methods], fontsize=7)
    lo_x = min(min(means) - max(sds) - 0.05, 0.9)
    ax.set_xlim(max(0.0, lo_x), 1.0)
    ax.set_xlabel("DSC (bars: mean ± sd over seeds; dots: seeds)")
    ax.set_title(f"{name} ({site['role']}) test set", fontsize=9)


def study_figures(study: dict[str, Any], runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write ``dice_by_method.png`` and ``per_video.png``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = study["sites"]
    ours, labels = study["ours"], study["labels"]
    written = []
    n_rows = max(len(s["rows"]) for s in sites.values())
    fig, axes = plt.subplots(
        1, len(sites), figsize=(6.5 * len(sites), 0.32 * n_rows + 1.5), squeeze=False
    )
    for ax, (name, site) in zip(axes[0], sites.items(), strict=True):
        _dice_panel(ax, site, labels, ours, name)
    fig.suptitle(f"crossprobe study {study['experiment']} — seeds {study['seeds']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / "dice_by_method.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    targets = [n for n, s in sites.items() if s["role"] == contract.TARGET]
    if targets:
        name = targets[0]
        evs = [r["evaluation"][name] for r in runs]
        fig, ax = plt.subplots(figsize=(5, 5))

        def vid(m: str) -> np.ndarray | None:
            vs = [ev.get("per_video", {}).get(f"{m}/dice") for ev in evs]
            if any(v is None for v in vs) or len({len(v) for v in vs}) != 1:
                return None
            return np.mean(np.asarray(vs, dtype=float), axis=0)

        x = vid(arms.LOWER)
        if x is not None:
            markers = ((ours, "o"), (arms.SIMMIM, "s"), (arms.MTNXENT, "^"), (arms.UPPER, "x"))
            for m, marker in markers:
                yv = vid(m)
                if yv is not None:
                    ax.scatter(x, yv, marker=marker, label=labels.get(m, m), alpha=0.8)
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set_xlabel("lower bound: per-video DSC (mean over seeds)")
            ax.set_ylabel("method: per-video DSC")
            ax.set_title(f"{name}: one point per test video", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / "per_video.png"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written
