"""A study over seeds: the paper's Tables 3–8 with statistics that survive video data.

Input: the ``results.json`` of one federated run per seed (same sites, same test frames, different
training seed). Everything here works on the score vectors the sites returned — no frame is needed.

Per evaluated site and method:

- mean ± sd over seeds of the per-image mean DSC / IoU (and of the mean of per-video means);
- three paired two-sided Wilcoxon tests against ours on the seed-averaged score of each *image*
  (the paper's test), each *video* and each *patient*. Frames of one video are strongly correlated,
  so the per-image test overstates the evidence; the per-video test is the one verdicts use;
- the **noise floor**: the seed-to-seed sd of the lower bound's DSC on that site. A difference no
  larger than the noise floor is never called a win or a loss, whatever its p-value;
- the share of the lower→upper gap that ours closes (target sites), from the seed means and per
  seed.

Plus: the fusion mode chosen on source validation (Table 7), one table per setting a study varies
(Tables 5 and 6: temperature, frame gap, sampler …), the fused pairs (Table 8), and the same-recipe
check — two seeds of the lower bound compared with the per-image and the per-video test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common import arms
from common.config import ExperimentConfig
from common.fl.contract import TARGET
from common.metrics import SCORES, paired_wilcoxon
from server.report import evaluated_test_sets
from server.tables import fmt, fusion_table, gap_share, pvalue

ALPHA = 0.05
UNITS = ("image", "video", "patient")


def _sd(x: Sequence[float]) -> float | None:
    return float(np.std(x, ddof=1)) if len(x) > 1 else None


def _vectors(runs: list[dict[str, Any]], key: str, unit: str) -> np.ndarray | None:
    """(seeds, n) score vectors of one "<method>/<score>" key, or None where a run lacks it or the
    lengths differ (different test sets cannot be paired)."""
    field = f"per_{unit}"
    vecs = [ev.get(field, {}).get(key) for ev in runs]
    if not vecs or any(not v for v in vecs) or len({len(v) for v in vecs}) != 1:
        return None
    return np.asarray(vecs, dtype=float)


def verdict(delta: float, p_video: float | None, noise: float | None, n_seeds: int) -> str:
    """How ours compares with a method: ``delta`` = ours − method (mean DSC over seeds).

    A call needs ≥ 2 seeds, |delta| above the noise floor, and per-video p < 0.05."""
    if n_seeds < 2 or noise is None:
        return "no call (1 seed: noise floor unknown)"
    if abs(delta) <= noise:
        return "within noise"
    if p_video is None or not math.isfinite(p_video) or p_video >= ALPHA:
        return "not significant per video"
    return "ours better" if delta > 0 else "ours worse"


def _site_rows(
    methods: list[str], ours: str, evs: list[dict[str, Any]], role: str
) -> tuple[dict[str, Any], float | None]:
    """Rows for one site from its evaluation entry in each seed's run."""
    rows: dict[str, Any] = {}
    lower_dice = [
        float(np.mean(ev["per_image"][f"{arms.LOWER}/dice"]))
        for ev in evs
        if f"{arms.LOWER}/dice" in ev["per_image"]
    ]
    noise = _sd(lower_dice) if len(lower_dice) == len(evs) else None
    for m in methods:
        have = [ev for ev in evs if f"{m}/dice" in ev["per_image"]]
        if not have:
            continue
        row: dict[str, Any] = {
            "seeds": len(have),
            "seed_index": [i for i, ev in enumerate(evs) if f"{m}/dice" in ev["per_image"]],
        }
        for s in SCORES:
            per_seed = [float(np.mean(ev["per_image"][f"{m}/{s}"])) for ev in have]
            row[s] = float(np.mean(per_seed))
            row[f"{s}_sd"] = _sd(per_seed)
            row[f"{s}_per_seed"] = per_seed
            vid = [
                float(np.mean(ev["per_video"][f"{m}/{s}"]))
                for ev in have
                if ev.get("per_video", {}).get(f"{m}/{s}")
            ]
            if len(vid) == len(have):
                row[f"video_{s}"] = float(np.mean(vid))
            paired = [ev for ev in have if f"{ours}/{s}" in ev["per_image"]]
            if m == ours or not paired:
                continue
            for unit in UNITS:  # on the seeds that have both (a study's variants may run on fewer)
                a = _vectors(paired, f"{m}/{s}", unit)
                b = _vectors(paired, f"{ours}/{s}", unit)
                if a is None or b is None or a.shape != b.shape or a.shape[1] < 2:
                    continue
                pv, st = paired_wilcoxon(a.mean(0), b.mean(0))
                row[f"p_{unit}_{s}"], row[f"stars_{unit}_{s}"] = pv, st
                row[f"n_{unit}"] = int(a.shape[1])
        if m != ours and ours in rows:
            # on the seeds both ran (a variant may run on fewer seeds than ours)
            row["delta_dice"] = on_seeds(rows[ours], row["seed_index"]) - row["dice"]
            row["verdict"] = verdict(
                row["delta_dice"],
                row.get("p_video_dice"),
                noise,
                min(row["seeds"], rows[ours]["seeds"]),
            )
        rows[m] = row
    return rows, noise


def on_seeds(row: dict[str, Any], index: list[int]) -> float:
    """A method's mean DSC over the given seed indices (those it shares with another method)."""
    by = dict(zip(row["seed_index"], row["dice_per_seed"], strict=True))
    common = [by[i] for i in index if i in by]
    return float(np.mean(common)) if common else float("nan")


def _gap(rows: dict[str, Any], ours: str) -> dict[str, Any] | None:
    try:
        o, lo, up = (rows[k]["dice_per_seed"] for k in (ours, arms.LOWER, arms.UPPER))
    except KeyError:
        return None
    if len(o) != len(lo) or len(o) != len(up):
        return None
    lo_m, up_m = rows[arms.LOWER]["dice"], rows[arms.UPPER]["dice"]
    return {
        "gap_dice": up_m - lo_m,
        "closed": gap_share(rows[ours]["dice"], lo_m, up_m),
        "closed_per_seed": [gap_share(a, b, c) for a, b, c in zip(o, lo, up, strict=True)],
    }


def _same_recipe(evs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seeds 1 and 2 of the lower bound are the same recipe: what do the tests say about them?"""
    if len(evs) < 2:
        return None
    out: dict[str, Any] = {"method": arms.LOWER}
    for unit in UNITS:
        a = evs[0].get(f"per_{unit}", {}).get(f"{arms.LOWER}/dice")
        b = evs[1].get(f"per_{unit}", {}).get(f"{arms.LOWER}/dice")
        if a and b and len(a) == len(b) and len(a) > 1:
            out[f"p_{unit}"] = paired_wilcoxon(a, b)[0]
            out[f"n_{unit}"] = len(a)
    return out


def _arm_branches(cfg: ExperimentConfig) -> dict[str, str]:
    """Arm -> the branch it was made with (built-in arms and the study's variants)."""
    out = {b.arm: b.name for b in arms.BRANCHES.values()}
    out.update({v.name: v.branch for v in cfg.study.variants})
    return out


def _get(cfg: ExperimentConfig, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def ablations(
    cfg: ExperimentConfig, rows: dict[str, Any], ours: str, noise: float | None = None
) -> list[dict[str, Any]]:
    """One table per setting the study's variants change (seed twins go to the pairs table).

    Each row: arm, setting value, single-model DSC (mean ± sd), Δ vs the branch's base arm with the
    per-video p, and the DSC of that arm fused with SimMIM where the study ran that pair."""
    groups: dict[tuple[str, str], list[tuple[Any, str]]] = {}
    for v in cfg.study.variants:
        keys = [k for k in v.set if k != "seed"]
        if not keys:
            continue
        key = keys[0] if len(keys) == 1 else "+".join(sorted(keys))
        groups.setdefault((v.branch, key), []).append(
            (", ".join(str(v.set[k]) for k in keys), v.name)
        )
    tables = []
    mode = cfg.fusion.default_mode
    for (branch, key), members in groups.items():
        base = arms.branch(branch).arm
        try:
            base_value = ", ".join(str(_get(cfg, k)) for k in key.split("+"))
        except AttributeError:
            base_value = "base"
        entries = [(base_value, base), *members]
        if key == "contrastive.min_frame_gap" and arms.SIMCLR in rows:
            entries.append(("0", arms.SIMCLR))
        out = []
        for value, arm in entries:
            if arm not in rows:
                continue
            r = rows[arm]
            fused = arms.fusion_name(mode, (arms.SIMMIM, arm))
            row = {
                "arm": arm,
                "value": value,
                "dice": r["dice"],
                "dice_sd": r.get("dice_sd"),
                "seeds": r["seeds"],
                "base": arm == base,
                "fused_dice": rows[fused]["dice"] if fused in rows else None,
            }
            if arm != base and base in rows:
                row["delta_vs_base"] = r["dice"] - on_seeds(rows[base], r["seed_index"])
                row["beyond_noise"] = None if noise is None else abs(row["delta_vs_base"]) > noise
            out.append(row)
        tables.append({"branch": branch, "setting": key, "rows": out})
    return tables


def pairs_table(cfg: ExperimentConfig, rows: dict[str, Any], ours: str) -> list[dict[str, Any]]:
    """Table 8: the main (heterogeneous) pair and every extra fused pair, default fusion mode."""
    branches = _arm_branches(cfg)
    mode = cfg.fusion.default_mode
    out = []
    for a, b in [arms.MAIN_PAIR, *cfg.study.pairs]:
        name = arms.fusion_name(mode, (a, b))
        if name not in rows:
            continue
        kind = "homogeneous" if branches.get(a) == branches.get(b) else "heterogeneous"
        r = rows[name]
        out.append(
            {
                "pair": f"{a} + {b}",
                "kind": kind,
                "method": name,
                "dice": r["dice"],
                "dice_sd": r.get("dice_sd"),
                "seeds": r["seeds"],
                # on the seeds the pair ran
                "best_single": max(on_seeds(rows[x], r["seed_index"]) for x in (a, b) if x in rows)
                if a in rows or b in rows
                else None,
                "p_video_dice": r.get("p_video_dice"),
            }
        )
    return out


def fusion_selection_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Table 7 over seeds: each mode's source-validation DSC (mean over seeds), the mode chosen
    there, and the test DSC of each mode."""
    sels = [r.get("fusion_selection") for r in runs if r.get("fusion_selection")]
    if not sels:
        return None
    modes = list(sels[0]["val_dice"])
    val = {m: float(np.mean([s["val_dice"][m] for s in sels])) for m in modes}
    best = max(val, key=val.get)  # type: ignore[arg-type]
    sites = list(sels[0]["test_dice"])
    test = {
        n: {m: float(np.mean([s["test_dice"][n][m] for s in sels])) for m in modes} for n in sites
    }
    return {
        "seeds": len(sels),
        "val_dice": val,
        "selected": best,
        "selected_per_seed": [s["selected"] for s in sels],
        "test_dice": test,
    }


def aggregate(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    runs: list[dict[str, Any]],
    walls: Sequence[float] = (),
) -> dict[str, Any]:
    """The study from one ``results.json`` per seed (same order as ``seeds``).

    Raises:
        ValueError: no runs, or runs that evaluated different sites.
    """
    if not runs:
        raise ValueError("a study needs at least one run's results.json")
    if len(runs) != len(seeds):
        raise ValueError(f"{len(runs)} results for {len(seeds)} seeds")
    ours = runs[0]["ours"]
    adapted = runs[0].get("ours_adapted")  # ours+adapt: the targets adapted the pair
    methods: list[str] = list(dict.fromkeys(m for r in runs for m in r["methods"]))
    labels: dict[str, str] = {}
    for r in runs:
        labels.update(r["labels"])
    site_names = list(evaluated_test_sets(runs[0]["evaluation"]))
    for r, s in zip(runs, seeds, strict=True):
        names = list(evaluated_test_sets(r["evaluation"]))
        if names != site_names:
            raise ValueError(f"seed {s} evaluated sites {names}, seed {seeds[0]} {site_names}")
    sites: dict[str, Any] = {}
    for name in site_names:
        evs = [evaluated_test_sets(r["evaluation"])[name] for r in runs]
        role = evs[0]["role"]
        rows, noise = _site_rows(methods, ours, evs, role)
        m0 = evs[0]["metrics"]
        sites[name] = {
            "role": role,
            "n_images": evs[0]["num_examples"],
            "n_videos": int(m0.get("n_videos", len(next(iter(evs[0]["per_video"].values()), [])))),
            "n_patients": int(m0["n_patients"]) if "n_patients" in m0 else None,
            "n_empty_gt": int(m0.get("n_empty_gt", 0)),
            "noise_floor": noise,
            "rows": rows,
            "gap": _gap(rows, ours) if role == TARGET else None,
            "gap_adapted": _gap(rows, adapted) if role == TARGET and adapted else None,
            "same_recipe": _same_recipe(evs),
            "ablations": ablations(cfg, rows, ours, noise),
            "pairs": pairs_table(cfg, rows, ours),
        }
    return {
        "experiment": cfg.name,
        "seeds": list(seeds),
        "finetune_repeats": cfg.study.finetune_repeats,
        "ours": ours,
        "methods": methods,
        "labels": labels,
        "sites": sites,
        "fusion_selection": fusion_selection_over_seeds(runs),
        "wall_seconds": list(walls),
        "alpha": ALPHA,
    }


# ---------------------------------------------------------------- rendering
def _pm(mean: float | None, sd: float | None) -> str:
    return fmt(mean) + ("" if sd is None else f" ± {sd:.4f}")


def _yn(x: bool | None) -> str:
    return "–" if x is None else "yes" if x else "no"


def _header(study: dict[str, Any]) -> list[str]:
    lines = [
        f"# crossprobe study — {study['experiment']}",
        "",
        f"Seeds {study['seeds']} (one federated run each; same sites and test frames, different "
        "training seed). DSC/IoU: mean over seeds of the per-image mean, ± sd over seeds. p: "
        "paired two-sided Wilcoxon vs ours on the seed-averaged score per image (the paper's "
        "test), per video and per patient. A verdict needs |Δ| above the noise floor (the lower "
        "bound's seed-to-seed sd) and per-video p < 0.05.",
        "",
    ]
    k = study.get("finetune_repeats", 1)
    if k > 1:
        lines += [
            f"Each seed pretrained once and fine-tuned every arm {k} times (other initial weights "
            f"and batch order); its scores are the mean of the {k} runs, per image.",
            "",
        ]
    if study.get("wall_seconds"):
        w = study["wall_seconds"]
        lines += [f"Wall time per seed: {', '.join(f'{x / 60:.1f} min' for x in w)}.", ""]
    return lines


def _main_table(site: dict[str, Any], labels: dict[str, str], ours: str) -> list[str]:
    """Tables 3/4 over seeds: every method against ours, with the three tests and a verdict."""
    lines = [
        "| method | seeds | DSC | IoU | video DSC | Δ DSC (ours − method) | p image | p video "
        "| p patient | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in site["rows"].items():
        delta = fmt(r.get("delta_dice")) if m != ours else "(ours)"
        lines.append(
            f"| {labels.get(m, m)} | {r['seeds']} | {_pm(r['dice'], r['dice_sd'])} | "
            f"{_pm(r['iou'], r['iou_sd'])} | {fmt(r.get('video_dice'))} | "
            f"{delta} | {pvalue(r.get('p_image_dice'))} | "
            f"{pvalue(r.get('p_video_dice'))} | {pvalue(r.get('p_patient_dice'))} | "
            f"{r.get('verdict', '')} |"
        )
    return [*lines, ""]


def _gap_lines(site: dict[str, Any]) -> list[str]:
    lines = []
    for key, who in (("gap", "ours"), ("gap_adapted", "ours+adapt")):
        g = site.get(key)
        if not g or g["closed"] is None:
            continue
        per = ", ".join("–" if x is None else f"{100 * x:.0f} %" for x in g["closed_per_seed"])
        lines += [
            f"Lower→upper gap {g['gap_dice']:.4f} DSC; {who} closes **{100 * g['closed']:.0f} %** "
            f"of it (per seed: {per}; paper's method: 52 %).",
            "",
        ]
    return lines


def _same_recipe_lines(site: dict[str, Any], seeds: list[int]) -> list[str]:
    sr = site.get("same_recipe")
    if not sr or "p_image" not in sr:
        return []
    return [
        f"Same recipe, two seeds (lower bound, seed {seeds[0]} vs {seeds[1]}): "
        f"per-image p = {pvalue(sr['p_image'])} (n = {sr['n_image']}), per-video p = "
        f"{pvalue(sr.get('p_video'))} (n = {sr.get('n_video', '–')}), per-patient p = "
        f"{pvalue(sr.get('p_patient'))} (n = {sr.get('n_patient', '–')}).",
        "",
    ]


def _ablation_lines(t: dict[str, Any]) -> list[str]:
    """Tables 5/6 (and any other setting a study varies): one arm per value."""
    lines = [
        f"### {t['setting']} ({t['branch']} branch)",
        "",
        "| arm | value | seeds | DSC | Δ vs base (same seeds) | beyond noise floor "
        "| fused with SimMIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        base = " (base)" if r["base"] else ""
        lines.append(
            f"| {r['arm']}{base} | {r['value']} | {r['seeds']} | {_pm(r['dice'], r['dice_sd'])} | "
            f"{fmt(r.get('delta_vs_base'))} | {_yn(r.get('beyond_noise'))} | "
            f"{fmt(r['fused_dice'])} |"
        )
    return [*lines, ""]


def _pairs_lines(pairs: list[dict[str, Any]]) -> list[str]:
    """Table 8: heterogeneous and homogeneous fused pairs."""
    if len(pairs) <= 1:
        return []
    lines = [
        "### Fused pairs (paper Table 8)",
        "",
        "| pair | kind | seeds | fused DSC | better single DSC (same seeds) | p video vs ours |",
        "|---|---|---|---|---|---|",
    ]
    for r in pairs:
        lines.append(
            f"| {r['pair']} | {r['kind']} | {r['seeds']} | {_pm(r['dice'], r['dice_sd'])} | "
            f"{fmt(r['best_single'])} | {pvalue(r['p_video_dice'])} |"
        )
    return [*lines, ""]


def _site_section(name: str, site: dict[str, Any], study: dict[str, Any]) -> list[str]:
    title = "Target" if site["role"] == TARGET else "Source"
    patients = f" of {site['n_patients']} patients" if site.get("n_patients") else ""
    lines = [
        f"## {title} test set — {name}",
        "",
        f"{site['n_images']} labeled test images in {site['n_videos']} videos{patients}; "
        f"{site['n_empty_gt']} with empty ground truth. "
        f"**Noise floor** (lower bound's seed-to-seed sd of DSC): {fmt(site['noise_floor'])}.",
        "",
        *_main_table(site, study["labels"], study["ours"]),
        *_gap_lines(site),
        *_same_recipe_lines(site, study["seeds"]),
    ]
    for t in site["ablations"]:
        lines += _ablation_lines(t)
    return lines + _pairs_lines(site["pairs"])


def _fusion_lines(sel: dict[str, Any] | None) -> list[str]:
    if not sel:
        return []
    return [
        "## Fusion mode chosen on source validation (paper Table 7)",
        "",
        f"Selected over {sel['seeds']} seed(s): **{sel['selected']}** (per seed: "
        f"{', '.join(sel['selected_per_seed'])}).",
        "",
        *fusion_table(sel["val_dice"], sel["selected"], sel["test_dice"]),
        "",
    ]


def render_markdown(study: dict[str, Any]) -> str:
    """``study.md``: one section per evaluated site, then the fusion-mode choice."""
    lines = _header(study)
    for name, site in study["sites"].items():
        lines += _site_section(name, site, study)
    lines += _fusion_lines(study.get("fusion_selection"))
    if len(study["seeds"]) < 2:
        lines += ["With one seed there is no noise floor: no difference is called.", ""]
    return "\n".join(lines)
