"""How big is the device gap the phantom makes? The lower→upper DSC gap on the target test set.

    python -m simulations.phantom.calibrate --config configs/experiments/tables.yaml \\
        --difficulty 1.0 2.0 --seeds 0 1

For each phantom setting, the target site is rendered with that ``synth.difficulty`` (the source
keeps its config's: the shift under study is the target's device and operator), every site with
``--annotation-noise`` if given (and, with ``--target-preset``, the target site with another
preset), then — in process, with
the same stage functions the federated run uses — the lower bound is fine-tuned at the source, the
upper bound at the target, and both are scored on the target's labeled test frames. The method does
not enter: this measures the benchmark, so the phantom (not the method) is what gets tuned, and the
default difficulty should leave a gap of at least 0.10 DSC, or there is no domain gap for the method
to close. The lower bound is also scored on the source's test set (its in-domain DSC: how clean the
source task is). Writes ``calibration.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import arms
from common.config import load_experiment


def probe(
    config: Path,
    difficulty: float,
    seeds: list[int],
    out: Path,
    target_preset: str | None = None,
    annotation_noise: float | None = None,
    repeats: int = 1,
) -> dict:
    """Lower and upper bound DSC on the target test set for one phantom setting, per seed.

    ``repeats`` > 1: the lower bound is fine-tuned that many times per seed (``finetune.repeat``
    0…k−1: other initial weights, batch order and augmentations) and scored as the mean of the
    runs, as a study with ``study.finetune_repeats`` scores every arm; the noise floor is then the
    sd of those means over the seeds."""
    import torch

    from common import stages
    from common.data.datasets import SegDataset
    from common.data.manifest import load_site
    from simulations.experiment import repeat_config
    from simulations.phantom.edge import padding_edge_share
    from simulations.sites import ensure_site

    cfg = load_experiment(config)
    sites = []
    for s in cfg.sites:
        update: dict = {}
        if s.role == "target":
            update["difficulty"] = difficulty
            if target_preset:
                update["preset"] = target_preset
        if annotation_noise is not None:
            update["annotation_noise"] = annotation_noise
        sites.append(s.model_copy(update={"synth": s.synth.model_copy(update=update)}))
    tag = f"d{difficulty:g}" + (f"-{target_preset}" if target_preset else "")
    tag += "" if annotation_noise is None else f"-a{annotation_noise:g}"
    root = out / tag
    data = {s.role: load_site(ensure_site(s, cfg.model.img_size, root / "data")) for s in sites}
    target_test = SegDataset(data["target"], "test", cfg.model.img_size)
    rows, lower_per_video = [], []
    for seed in seeds:
        c = cfg.model_copy(update={"seed": seed})
        t0 = time.monotonic()
        upper = stages.finetune(
            c, data["target"], root / f"s{seed}-upper", None, arms.UPPER, progress=False
        )
        ev = stages.evaluate(
            c, data["target"], root / f"s{seed}-eval-upper", {arms.UPPER: upper.state},
            progress=False,
        )  # fmt: skip
        upper_dice = ev.metrics[f"{arms.UPPER}/dice"]
        first, runs, videos = None, [], []  # the lower bound's first weights; DSC per run
        for r in range(repeats):
            tag_r = f"s{seed}" + (f"-r{r}" if r else "")
            lower = stages.finetune(
                repeat_config(c, r), data["source"], root / f"{tag_r}-lower", None, arms.LOWER,
                progress=False,
            ).state  # fmt: skip
            ev = stages.evaluate(
                c, data["target"], root / f"{tag_r}-eval", {arms.LOWER: lower}, progress=False
            )
            runs.append(ev.metrics[f"{arms.LOWER}/dice"])
            videos.append(ev.per_video[f"{arms.LOWER}/dice"])
            first = lower if first is None else first
        # the first run stands for the others in the in-domain and padding-edge diagnostics
        models = {arms.LOWER: first, arms.UPPER: upper.state}
        src = stages.evaluate(
            c, data["source"], root / f"s{seed}-eval-source", {arms.LOWER: first},
            progress=False,
        )  # fmt: skip
        nets = stages.load_models(c, models, torch.device("cpu"), share=True)
        lower_per_video.append(np.mean(videos, axis=0))
        rows.append(
            {
                "seed": seed,
                "lower": float(np.mean(runs)),
                "lower_runs": runs,
                "upper": upper_dice,
                "gap": upper_dice - float(np.mean(runs)),
                "lower_in_domain": src.metrics[f"{arms.LOWER}/dice"],
                # share of target test frames with bone drawn along the zero padding's edge
                "lower_edge": padding_edge_share(nets[arms.LOWER], target_test),
                "upper_edge": padding_edge_share(nets[arms.UPPER], target_test),
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        print(
            f"[calibrate {tag}] seed {seed}: lower {rows[-1]['lower']:.4f}"
            + (f" (mean of {', '.join(f'{x:.4f}' for x in runs)}) " if repeats > 1 else " ")
            + f"upper {rows[-1]['upper']:.4f} gap {rows[-1]['gap']:.4f} "
            f"(lower on the source test set {rows[-1]['lower_in_domain']:.4f}; bone along the "
            f"padding edge: lower {rows[-1]['lower_edge']:.1%}, upper {rows[-1]['upper_edge']:.1%} "
            "of the target test frames)",
            flush=True,
        )
    gaps = [r["gap"] for r in rows]
    return {
        "difficulty": difficulty,
        "target_preset": target_preset,
        "annotation_noise": annotation_noise,
        "rows": rows,
        "gap_mean": float(np.mean(gaps)),
        "gap_sd": _sd(gaps),
        "repeats": repeats,
        "noise_floor": _sd([r["lower"] for r in rows]),  # the lower bound's sd over the seeds
        # what one fine-tuning run per seed would show: the sd over every single run (each draws
        # its own initial weights and batch order)
        "noise_floor_single_run": _sd([x for r in rows for x in r["lower_runs"]]),
        "noise_floor_from_videos": interaction_floor(np.array(lower_per_video)),
    }


def interaction_floor(per_video: np.ndarray) -> float | None:
    """The part of the noise floor that comes from seeds doing better on some videos and worse on
    others (seed × video interaction), from a (seeds, videos) array of per-video DSC.

    It is the sd the seed means would have if each seed differed from the others only in that
    interaction; the rest of the floor is a shift of the whole model. A larger test set shrinks
    this part alone (as 1/√videos)."""
    s, v = per_video.shape
    if s < 2:
        return None
    resid = per_video - per_video.mean(0) - per_video.mean(1, keepdims=True) + per_video.mean()
    return float(np.sqrt((resid**2).sum(0).mean() / (s - 1) / v))


def _sd(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def main() -> None:  # pragma: no cover - a measurement script
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=Path("configs/experiments/tables.yaml"))
    ap.add_argument("--difficulty", type=float, nargs="+", default=[1.0])
    ap.add_argument(
        "--target-preset", default=None, help="another synth preset for the target site"
    )
    ap.add_argument(
        "--annotation-noise", type=float, default=None,
        help="every site's synth.annotation_noise (default: the config's)",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--repeats", type=int, default=1,
        help="fine-tune the lower bound this many times per seed and score the mean",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("runs/calibration"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = [
        probe(a.config, d, a.seeds, a.out, a.target_preset, a.annotation_noise, a.repeats)
        for d in a.difficulty
    ]
    (a.out / "calibration.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        sd = "" if r["gap_sd"] is None else f" ± {r['gap_sd']:.4f}"
        floor = (
            ""
            if r["noise_floor"] is None
            else f", noise floor {r['noise_floor']:.4f} (from the seed × video interaction "
            f"alone {r['noise_floor_from_videos']:.4f})"
        )
        print(
            f"target difficulty {r['difficulty']:g}: lower→upper gap {r['gap_mean']:.4f}{sd} "
            f"DSC{floor}"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
