"""results.json and report.md in the style of the paper's Tables 3/4.

Per evaluated site: DSC and IoU mean per method, paired two-sided Wilcoxon of each method against
ours on the same images (stars *** < 0.001, ** < 0.01, * < 0.05), the same test on per-video means
(frames of one video are strongly correlated, so the per-image test overstates significance), and
the share of the lower→upper gap that ours closes, (ours − lower) / (upper − lower).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np

from common import arms, ssl_health
from common.config import ExperimentConfig
from common.fl.contract import SOURCE, TARGET
from common.metrics import SCORES, paired_wilcoxon
from server.tables import fusion_table, gap_share, pct


def method_order(cfg: ExperimentConfig) -> list[str]:
    """Ours first (then ours+adapt when the targets adapted), then the other fusion modes, the
    single branches (and their adapted versions), the study's variant arms and extra fused pairs,
    the bounds."""
    default = cfg.fusion.default_mode
    modes = [default, *(m for m in cfg.fusion.modes if m != default)]
    ours = arms.ours(default)
    fusions = [arms.fusion_name(m, arms.MAIN_PAIR) for m in cfg.fusion.modes]
    built_in = [arms.BRANCHES[b].arm for b in arms.pretrain_branches(cfg.contrastive.simclr_arm)]
    variants = [v.name for v in cfg.study.variants]
    pairs = [
        arms.fusion_name(m, (a, b))
        for a, b in dict.fromkeys(cfg.study.pairs)
        if (a, b) != arms.MAIN_PAIR
        for m in modes
    ]
    rest = [f for f in fusions if f != ours]
    adapted: list[str] = []
    if cfg.adapt.method != "none":
        adapted = [arms.fusion_name(m, arms.ADAPTED_PAIR) for m in modes]
        built_in += list(arms.ADAPTED_PAIR)
    top = [ours, *adapted[:1], *rest, *adapted[1:]]
    return [*top, *built_in, *variants, *pairs, arms.LOWER, arms.UPPER]


def label(cfg: ExperimentConfig, method: str) -> str:
    """A method's name as the tables print it."""
    for v in cfg.study.variants:
        if v.name == method:
            changed = ", ".join(f"{k.split('.')[-1]} = {x}" for k, x in v.set.items())
            return f"{v.name} ({v.branch}{': ' + changed if changed else ''})"
    default = cfg.fusion.default_mode
    names = {
        arms.ours(default): f"Ours (SimMIM + MT-NXent, {default} fusion)",
        arms.ours_adapted(default): f"Ours+adapt ({cfg.adapt.method} at the target)",
        arms.ADAPTED_PAIR[0]: f"SimMIM, adapted ({cfg.adapt.method})",
        arms.ADAPTED_PAIR[1]: f"MT-NXent, adapted ({cfg.adapt.method})",
        arms.SIMMIM: "SimMIM",
        arms.MTNXENT: f"MT-NXent (t = {cfg.contrastive.min_frame_gap})",
        arms.SIMCLR: "SimCLR (t = 0)",
        arms.LOWER: "Lower bound (source-trained)",
        arms.UPPER: "Upper bound (target-trained)",
    }
    if method in names:
        return names[method]
    m = arms.parse_method(method)
    return f"Fusion ({method.removeprefix('fusion-')})" if m.is_fusion else method


def _paired_tests(row: dict[str, Any], ev: dict[str, Any], key: str, ours_key: str, s: str) -> None:
    """Wilcoxon of one method against ours on the same images, videos and patients."""
    pv, st = paired_wilcoxon(ev["per_image"][key], ev["per_image"][ours_key])
    row[f"p_{s}"], row[f"stars_{s}"] = pv, st
    for unit in ("video", "patient"):
        vv = ev.get(f"per_{unit}", {}).get(key)
        vo = ev.get(f"per_{unit}", {}).get(ours_key)
        if vv and vo and len(vv) == len(vo) and len(vv) > 1:
            pv, st = paired_wilcoxon(vv, vo)
            row[f"p_{unit}_{s}"], row[f"stars_{unit}_{s}"] = pv, st


def _method_row(m: str, ours: str, ev: dict[str, Any]) -> dict[str, Any]:
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
            _paired_tests(row, ev, key, f"{ours}/{s}", s)
    return row


def _site_table(methods: list[str], ours: str, ev: dict[str, Any]) -> dict[str, Any]:
    rows = {m: _method_row(m, ours, ev) for m in methods}
    return {m: row for m, row in rows.items() if row}


def _gap(table: dict[str, Any], ours: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for s in SCORES:
        try:
            out[s] = gap_share(table[ours][s], table[arms.LOWER][s], table[arms.UPPER][s])
        except KeyError:
            out[s] = None
    return out


def evaluated_test_sets(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The evaluation entries of test sets (not the source-validation scoring of the fusions)."""
    return {n: ev for n, ev in evaluation.items() if ev.get("split", "test") == "test"}


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
    adapted = arms.ours_adapted(cfg.fusion.default_mode) if cfg.adapt.method != "none" else None
    tables = {
        name: _site_table(methods, ours, ev) for name, ev in evaluated_test_sets(evaluation).items()
    }
    return {
        "experiment": cfg.name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "rounds": cfg.rounds,
        "ours": ours,
        "ours_adapted": adapted,
        "methods": methods,
        "labels": {m: label(cfg, m) for m in methods},
        "sites": sites,
        "tables": tables,
        "gap_closed": {name: _gap(t, ours) for name, t in tables.items()},
        "gap_closed_adapted": {name: _gap(t, adapted) for name, t in tables.items()}
        if adapted
        else {},
        "fusion_selection": fusion_selection(cfg, evaluation),
        "evaluation": evaluation,
        "phases": phases,
        "stage_metrics": stage_metrics,
        "pretraining_health": pretraining_health(stage_metrics),
    }


def fusion_selection(cfg: ExperimentConfig, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """Paper Table 7: each fusion mode's Dice on the source sites' validation frames (pooled over
    images), the mode that wins there, and that mode's score on every test set."""
    val = [ev for ev in evaluation.values() if ev.get("split") == "val"]
    score = {}
    for m in cfg.fusion.modes:
        key = f"{arms.fusion_name(m, arms.MAIN_PAIR)}/dice"
        vec = [x for ev in val for x in ev["per_image"].get(key, [])]
        if vec:
            score[m] = float(np.mean(vec))
    if not score:
        return None
    best = max(score, key=lambda m: (score[m], m == cfg.fusion.default_mode))
    keys = {m: f"{arms.fusion_name(m, arms.MAIN_PAIR)}/dice" for m in score}
    test = {
        n: {m: float(np.mean(ev["per_image"][k])) for m, k in keys.items()}
        for n, ev in evaluated_test_sets(evaluation).items()
        if keys[best] in ev["per_image"]
    }
    return {
        "val_sites": [ev.get("site", "") for ev in val],
        "val_images": sum(int(ev["num_examples"]) for ev in val),
        "val_dice": score,
        "selected": best,
        "test_dice": test,
    }


# ---------------------------------------------------------------- report.md
def _cell(row: dict[str, Any] | None, s: str, video: bool = False) -> str:
    value = row.get(f"video_{s}" if video else s) if row else None
    if value is None:
        return "–"
    stars = row.get(f"stars_video_{s}" if video else f"stars_{s}", "")
    return f"{value:.4f}{(' ' + stars) if stars and stars != 'ns' else ''}"


def _score_table(results: dict[str, Any], names: list[str], video: bool) -> list[str]:
    """One row per method, a DSC and an IoU column per site (per image, or mean of per-video)."""
    lines = [
        "| method | " + " | ".join(f"{n} DSC | {n} IoU" for n in names) + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for m in results["methods"]:
        rows = [results["tables"][n].get(m) for n in names]
        if any(rows):
            cells = " | ".join(
                f"{_cell(r, 'dice', video)} | {_cell(r, 'iou', video)}" for r in rows
            )
            lines.append(f"| {results['labels'][m]} | {cells} |")
    return lines


def _site_notes(results: dict[str, Any], names: list[str], role: str) -> list[str]:
    """Test set sizes, and on target sites the share of the gap ours closes (the bounds bracket
    the target domain only: the upper model is target-trained)."""
    lines = []
    for n in names:
        g, ev = results["gap_closed"][n], results["evaluation"][n]
        gap = ""
        if role == TARGET:
            gap = (
                f"; share of the lower→upper gap closed by ours: DSC {pct(g['dice'])}, "
                f"IoU {pct(g['iou'])}"
            )
            if ga := results.get("gap_closed_adapted", {}).get(n):
                gap += f"; by ours+adapt: DSC {pct(ga['dice'])}, IoU {pct(ga['iou'])}"
        videos = len(next(iter(ev["per_video"].values()), []))
        lines.append(f"- {n}: {ev['num_examples']} test images in {videos} videos{gap}")
    return lines


def _role_section(results: dict[str, Any], role: str, title: str) -> list[str]:
    names = [
        n for n, ev in evaluated_test_sets(results["evaluation"]).items() if ev["role"] == role
    ]
    if not names:
        return []
    return [
        f"## {title}",
        "",
        "Mean per image; stars: paired two-sided Wilcoxon vs ours on the same images "
        "(*** p < 0.001, ** p < 0.01, * p < 0.05).",
        "",
        *_score_table(results, names, video=False),
        "",
        *_site_notes(results, names, role),
        "",
        "Mean of per-video means; stars: paired Wilcoxon on per-video means (the honest test: "
        "frames of one video are correlated):",
        "",
        *_score_table(results, names, video=True),
        "",
    ]


def _fusion_section(sel: dict[str, Any] | None) -> list[str]:
    if not sel:
        return []
    return [
        "## Fusion mode chosen on source validation (paper Table 7)",
        "",
        f"Selected: **{sel['selected']}** (on {sel['val_images']} labeled validation images at "
        f"{', '.join(sel['val_sites'])}; no test set was looked at).",
        "",
        *fusion_table(sel["val_dice"], sel["selected"], sel["test_dice"]),
        "",
    ]


_HEALTH = ("entropy", "agreement", "foreground")  # common/adapt.py: health()


def _adapt_section(results: dict[str, Any]) -> list[str]:
    """What each target's adapt phase reported: its budget and label-free signals of the fused
    pair on its own unlabeled frames, before → after (no label is read to compute them)."""
    by_site = results.get("stage_metrics", {}).get("adapt", {})
    if not by_site:
        return []
    lines = [
        "## Adaptation at the target (label-free signals on its own train frames)",
        "",
        "| site | steps | seconds | fused entropy (bits/px) | branch agreement | foreground |",
        "|---|---|---|---|---|---|",
    ]
    for site, rounds in by_site.items():
        m = rounds.get("round-1", {}).get(site, {})
        if m:
            cells = [f"{m[f'{k}_before']:.3f} → {m[f'{k}_after']:.3f}" for k in _HEALTH]
            lines.append(
                f"| {site} | {m['steps']:.0f} | {m['seconds']:.1f} | {' | '.join(cells)} |"
            )
    return [*lines, ""]


def _number(m: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    return format(m[key], fmt) if key in m else "—"


def pretraining_health(stage_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pretraining arm and target site, its last round's label-free signals and what they
    say (``common/ssl_health.py``)."""
    rows = []
    for key, rounds in stage_metrics.get("pretrain", {}).items():
        last = rounds[max(rounds, key=lambda r: int(r.split("-")[1]))] if rounds else {}
        for site, m in last.items():
            rows.append({"arm": key, "site": site, **m, "verdict": ssl_health.verdict(m)})
    return rows


def _pretraining_section(results: dict[str, Any]) -> list[str]:
    """Is SSL learning? The loss against its collapse (contrastive) or predict-the-mean (SimMIM)
    value and the embeddings' spread, from the batches each branch trained on; no label read."""
    rows = [r for r in results.get("pretraining_health", []) if r["verdict"]]
    if not rows:
        return []
    lines = [
        "## Pretraining at the target: is it learning? (label-free)",
        "",
        "Loss ratio: the last steps' loss over its collapse value (contrastive: all similarities "
        "equal) or over predicting each image's mean (SimMIM); below 1 is learning. Std × √d: 1 "
        "= spread like a uniform sphere, 0 = collapsed. Rank: effective rank of the embeddings.",
        "",
        "| arm | site | steps | loss | loss ratio | std × √d | rank | alignment | uniformity "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [_number(r, k) for k in ("train_loss", ssl_health.LOSS_RATIO, "ssl_std")]
        cells += [_number(r, "ssl_rank", ".1f"), _number(r, "ssl_alignment")]
        cells += [_number(r, "ssl_uniformity")]
        flag = r["verdict"] if r["verdict"] == "learning" else f"**{r['verdict']}**"
        lines.append(
            f"| {r['arm']} | {r['site']} | {r.get('steps', 0):.0f} | {' | '.join(cells)} | {flag} |"
        )
    return [*lines, ""]


def _phase_section(phases: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Phases",
        "",
        "| phase | seconds | sent | received | messages | resumed |",
        "|---|---|---|---|---|---|",
    ]
    for ph in phases:
        lines.append(
            f"| {ph['phase']} | {ph['seconds']:.1f} | {ph['bytes_sent'] / 2**20:.2f} MB | "
            f"{ph['bytes_received'] / 2**20:.2f} MB | {ph['messages']} | "
            f"{'yes' if ph['resumed'] else ''} |"
        )
    averaged = [r for ph in phases for r in ph.get("rounds", []) if r.get("averaged")]
    if averaged:
        lines += ["", "Federated averaging (by example count):", ""]
        lines += [
            f"- {r['key']} round {r['round']}: {', '.join(r['sites'])} ({r['num_examples']})"
            for r in averaged
        ]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The paper-style report (Tables 3/4) plus per-phase timings and bytes."""
    sites = ", ".join(f"{n} ({s['role']})" for n, s in results["sites"].items())
    lines = [
        f"# crossprobe — {results['experiment']}",
        "",
        f"{results['created']} · rounds per phase: {results['rounds']} · sites: {sites}",
        "",
        *_role_section(results, TARGET, "Target test set"),
        *_role_section(results, SOURCE, "Source test set"),
        *_fusion_section(results.get("fusion_selection")),
        *_pretraining_section(results),
        *_adapt_section(results),
        *_phase_section(results["phases"]),
        "",
    ]
    return "\n".join(lines)
