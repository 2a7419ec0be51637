"""Pieces both the run report (``server/report.py``) and the study (``server/study.py``) print:
number formats, the share of the lower→upper gap, and the fusion-selection table (paper Table 7)."""

from __future__ import annotations

import math


def fmt(x: float | None, nd: int = 4) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def pvalue(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def gap_share(ours: float, lower: float, upper: float) -> float | None:
    """The share of the lower→upper gap that ours closes, (ours − lower) / (upper − lower); None
    when there is no gap to close."""
    return (ours - lower) / (upper - lower) if upper - lower > 1e-12 else None


def fusion_table(
    val_dice: dict[str, float], selected: str, test_dice: dict[str, dict[str, float]]
) -> list[str]:
    """Paper Table 7: each fusion mode's source-validation DSC, the one selected there, and each
    mode's DSC on every test set (markdown lines)."""
    sites = list(test_dice)
    lines = [
        "| mode | source val DSC | " + " | ".join(f"{s} test DSC" for s in sites) + " |",
        "|---" * (2 + len(sites)) + "|",
    ]
    for mode, v in val_dice.items():
        mark = " ← selected" if mode == selected else ""
        cells = " | ".join(f"{test_dice[s][mode]:.4f}" for s in sites)
        lines.append(f"| {mode}{mark} | {v:.4f} | {cells} |")
    return lines
