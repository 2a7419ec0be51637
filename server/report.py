"""results.json and report.md in the style of the paper's Tables 3/4.

Per evaluated site: DSC and IoU mean per method, paired two-sided Wilcoxon of each method against
ours on the same images (stars *** < 0.001, ** < 0.01, * < 0.05), the same test on per-video means
(frames of one video are strongly correlated, so the per-image test overstates significance), and
the share of the lower→upper gap that ours closes, (ours − lower) / (upper − lower).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np

from common.config import ExperimentConfig
from common.fl import protocol as p
from common.metrics import paired_wilcoxon

SCORES = ("dice", "iou")


def method_order(cfg: ExperimentConfig) -> list[str]:
    """Ours first, then the other fusion modes, the single branches, the study's variant arms and
    extra fused pairs, the bounds."""
    ours = f"fusion-{cfg.fusion.default_mode}"
    fusions = [f"fusion-{m}" for m in cfg.fusion.modes if f"fusion-{m}" != ours]
    arms = [p.ARM_OF_BRANCH[p.SIMMIM], p.ARM_OF_BRANCH[p.CONTRASTIVE]]
    arms += [p.ARM_OF_BRANCH[p.SIMCLR]] if cfg.contrastive.simclr_arm else []
    variants = [v.name for v in cfg.study.variants]
    pairs = [
        f"fusion-{m}[{a}+{b}]"
        for a, b in dict.fromkeys(cfg.study.pairs)
        if (a, b) != p.FUSION_PAIR
        for m in (
            cfg.fusion.default_mode,
            *[x for x in cfg.fusion.modes if x != cfg.fusion.default_mode],
        )
    ]
    return [ours, *fusions, *arms, *variants, *pairs, p.LOWER, p.UPPER]


def label(cfg: ExperimentConfig, method: str) -> str:
    for v in cfg.study.variants:
        if v.name == method:
            changed = ", ".join(f"{k.split('.')[-1]} = {x}" for k, x in v.set.items())
            return f"{v.name} ({v.branch}{': ' + changed if changed else ''})"
    gap = cfg.contrastive.min_frame_gap
    names = {
        f"fusion-{cfg.fusion.default_mode}": f"Ours (SimMIM + MT-NXent, {cfg.fusion.default_mode} fusion)",
        "simmim": "SimMIM",
        "mtnxent": f"MT-NXent (t = {gap})",
        "simclr": "SimCLR (t = 0)",
        p.LOWER: "Lower bound (source-trained)",
        p.UPPER: "Upper bound (target-trained)",
    }
    if method in names:
        return names[method]
    if method.startswith("fusion-"):
        return f"Fusion ({method.removeprefix('fusion-')})"
    return method


def _site_table(methods: list[str], ours: str, ev: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for m in methods:
        row: dict[str, Any] = {}
        for s in SCORES:
            key = f"{m}/{s}"
            vec = ev["per_image"].get(key)
            if vec is None and key not in ev["metrics"]:
                continue
            row[s] = float(np.mean(vec)) if vec else float(ev["metrics"][key])
            if ev["per_video"].get(key):
                row[f"video_{s}"] = float(np.mean(ev["per_video"][key]))
            if ev.get("per_patient", {}).get(key):
                row[f"patient_{s}"] = float(np.mean(ev["per_patient"][key]))
            if m != ours and vec and f"{ours}/{s}" in ev["per_image"]:
                pv, st = paired_wilcoxon(vec, ev["per_image"][f"{ours}/{s}"])
                row[f"p_{s}"], row[f"stars_{s}"] = pv, st
                for unit in ("video", "patient"):
                    vv = ev.get(f"per_{unit}", {}).get(key)
                    vo = ev.get(f"per_{unit}", {}).get(f"{ours}/{s}")
                    if vv and vo and len(vv) == len(vo) and len(vv) > 1:
                        pv, st = paired_wilcoxon(vv, vo)
                        row[f"p_{unit}_{s}"], row[f"stars_{unit}_{s}"] = pv, st
        if row:
            table[m] = row
    return table


def _gap(table: dict[str, Any], ours: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for s in SCORES:
        try:
            o, lo, up = table[ours][s], table[p.LOWER][s], table[p.UPPER][s]
        except KeyError:
            out[s] = None
            continue
        out[s] = (o - lo) / (up - lo) if up - lo > 1e-12 else None  # no gap to close: n/a
    return out


def build_results(
    cfg: ExperimentConfig,
    sites: dict[str, Any],
    evaluation: dict[str, Any],
    phases: list[dict[str, Any]],
    stage_metrics: dict[str, Any],
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON (score vectors included for re-analysis)."""
    methods = method_order(cfg)
    ours = methods[0]
    test = {n: ev for n, ev in evaluation.items() if ev.get("split", "test") == "test"}
    tables = {name: _site_table(methods, ours, ev) for name, ev in test.items()}
    return {
        "experiment": cfg.name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "rounds": cfg.rounds,
        "ours": ours,
        "methods": methods,
        "labels": {m: label(cfg, m) for m in methods},
        "sites": sites,
        "tables": tables,
        "gap_closed": {name: _gap(t, ours) for name, t in tables.items()},
        "fusion_selection": fusion_selection(cfg, evaluation),
        "evaluation": evaluation,
        "phases": phases,
        "stage_metrics": stage_metrics,
    }


def fusion_selection(cfg: ExperimentConfig, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """Paper Table 7: each fusion mode's Dice on the source sites' validation frames (pooled over
    images), the mode that wins there, and that mode's score on every test set."""
    val = [ev for ev in evaluation.values() if ev.get("split") == "val"]
    if not val:
        return None
    modes = list(cfg.fusion.modes)
    score = {}
    for m in modes:
        vec = [x for ev in val for x in ev["per_image"].get(f"fusion-{m}/dice", [])]
        if vec:
            score[m] = float(np.mean(vec))
    if not score:
        return None
    best = max(score, key=lambda m: (score[m], m == cfg.fusion.default_mode))
    test = {
        n: {m: float(np.mean(ev["per_image"][f"fusion-{m}/dice"])) for m in score}
        for n, ev in evaluation.items()
        if ev.get("split", "test") == "test" and f"fusion-{best}/dice" in ev["per_image"]
    }
    return {
        "val_sites": [ev.get("site", "") for ev in val],
        "val_images": sum(int(ev["num_examples"]) for ev in val),
        "val_dice": score,
        "selected": best,
        "test_dice": test,
    }


def _cell(row: dict[str, Any] | None, s: str, video: bool = False) -> str:
    value = row.get(f"video_{s}" if video else s) if row else None
    if value is None:
        return "–"
    stars = row.get(f"stars_video_{s}" if video else f"stars_{s}", "")
    return f"{value:.4f}{(' ' + stars) if stars and stars != 'ns' else ''}"


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def render_markdown(results: dict[str, Any]) -> str:
    """The paper-style report (Tables 3/4) plus per-phase timings and bytes."""
    methods, _ours, labels = results["methods"], results["ours"], results["labels"]
    lines = [
        f"# crossprobe — {results['experiment']}",
        "",
        f"{results['created']} · rounds per phase: {results['rounds']} · sites: "
        + ", ".join(f"{n} ({s['role']})" for n, s in results["sites"].items()),
        "",
    ]
    for role, title in ((p.TARGET, "Target test set"), (p.SOURCE, "Source test set")):
        names = [
            n
            for n, ev in results["evaluation"].items()
            if ev["role"] == role and ev.get("split", "test") == "test"
        ]
        if not names:
            continue
        lines += [
            f"## {title}",
            "",
            "Mean per image; stars: paired two-sided Wilcoxon vs ours on the same images "
            "(*** p < 0.001, ** p < 0.01, * p < 0.05).",
            "",
        ]
        head = "| method | " + " | ".join(f"{n} DSC | {n} IoU" for n in names) + " |"
        lines += [head, "|---" * (1 + 2 * len(names)) + "|"]
        for m in methods:
            rows = [results["tables"][n].get(m) for n in names]
            if not any(rows):
                continue
            cells = " | ".join(f"{_cell(r, 'dice')} | {_cell(r, 'iou')}" for r in rows)
            lines.append(f"| {labels[m]} | {cells} |")
        lines.append("")
        for n in names:
            g = results["gap_closed"][n]
            ev = results["evaluation"][n]
            # the bounds bracket the target domain only (the "upper" model is target-trained)
            gap = (
                (
                    f"; share of the lower→upper gap closed by ours: DSC {_pct(g['dice'])}, "
                    f"IoU {_pct(g['iou'])}"
                )
                if role == p.TARGET
                else ""
            )
            lines.append(
                f"- {n}: {ev['num_examples']} test images in "
                f"{len(next(iter(ev['per_video'].values()), []))} videos{gap}"
            )
        lines += [
            "",
            "Mean of per-video means; stars: paired Wilcoxon on per-video means (the honest test: "
            "frames of one video are correlated):",
            "",
            "| method | " + " | ".join(f"{n} DSC | {n} IoU" for n in names) + " |",
            "|---" * (1 + 2 * len(names)) + "|",
        ]
        for m in methods:
            rows = [results["tables"][n].get(m) for n in names]
            if any(rows):
                cells = " | ".join(
                    f"{_cell(r, 'dice', True)} | {_cell(r, 'iou', True)}" for r in rows
                )
                lines.append(f"| {labels[m]} | {cells} |")
        lines.append("")
    sel = results.get("fusion_selection")
    if sel:
        lines += [
            "## Fusion mode chosen on source validation (paper Table 7)",
            "",
            f"Selected: **{sel['selected']}** (on {sel['val_images']} labeled validation images at "
            f"{', '.join(sel['val_sites'])}; no test set was looked at).",
            "",
            "| mode | source val DSC | "
            + " | ".join(f"{n} test DSC" for n in sel["test_dice"])
            + " |",
            "|---" * (2 + len(sel["test_dice"])) + "|",
        ]
        for m, v in sel["val_dice"].items():
            mark = " ← selected" if m == sel["selected"] else ""
            cells = " | ".join(f"{t[m]:.4f}" for t in sel["test_dice"].values())
            lines.append(f"| {m}{mark} | {v:.4f} | {cells} |")
        lines.append("")
    lines += [
        "## Phases",
        "",
        "| phase | seconds | sent | received | messages | resumed |",
        "|---|---|---|---|---|---|",
    ]
    for ph in results["phases"]:
        lines.append(
            f"| {ph['phase']} | {ph['seconds']:.1f} | {ph['bytes_sent'] / 2**20:.2f} MB | "
            f"{ph['bytes_received'] / 2**20:.2f} MB | {ph['messages']} | {'yes' if ph['resumed'] else ''} |"
        )
    averaged = [r for ph in results["phases"] for r in ph.get("rounds", []) if r.get("averaged")]
    if averaged:
        lines += ["", "Federated averaging (by example count):", ""]
        lines += [
            f"- {r['key']} round {r['round']}: {', '.join(r['sites'])} ({r['num_examples']})"
            for r in averaged
        ]
    lines.append("")
    return "\n".join(lines)
