"""server/study.py: the statistics a study's verdicts rest on, on hand-made score vectors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from common.config import load_experiment
from server.study import aggregate, render_markdown, verdict

CFG = load_experiment("configs/tiny.yaml")
OURS = "fusion-entropy"


def _run(scores: dict[str, np.ndarray], videos: list[int], patients: list[int]) -> dict:
    """A results.json with one target site; ``scores[m]`` is the per-image DSC of method m."""
    per_image, per_video, per_patient = {}, {}, {}
    for m, v in scores.items():
        for s, x in (("dice", v), ("iou", v / (2 - v))):
            per_image[f"{m}/{s}"] = list(map(float, x))
            per_video[f"{m}/{s}"] = [
                float(x[np.asarray(videos) == g].mean()) for g in dict.fromkeys(videos)
            ]
            per_patient[f"{m}/{s}"] = [
                float(x[np.asarray(patients) == g].mean()) for g in dict.fromkeys(patients)
            ]
    return {
        "ours": OURS,
        "methods": list(scores),
        "labels": {m: m for m in scores},
        "evaluation": {
            "telemed": {
                "role": "target",
                "split": "test",
                "num_examples": len(videos),
                "metrics": {
                    "n_videos": len(set(videos)),
                    "n_patients": len(set(patients)),
                    "n_empty_gt": 0,
                },
                "per_image": per_image,
                "per_video": per_video,
                "per_patient": per_patient,
            }
        },
    }


VIDEOS = [v for v in range(12) for _ in range(10)]  # 12 videos of 10 frames
PATIENTS = [v // 3 for v in VIDEOS]  # 4 patients


def _study(shift: float, lower_jitter: float, n_seeds: int = 3, video_effect: bool = False):
    rng = np.random.default_rng(0)
    vid_level = rng.uniform(0.5, 0.8, 12)
    base = vid_level[VIDEOS] + rng.normal(0, 0.01, len(VIDEOS))
    runs = []
    for s in range(n_seeds):
        lower = base + lower_jitter * (s - 1)
        eff = rng.normal(shift, 0.05, 12)[VIDEOS] if video_effect else shift
        runs.append(
            _run(
                {
                    OURS: lower + eff,
                    "simmim": lower + eff / 2,
                    "lower": lower,
                    "upper": lower + 0.2,
                },
                VIDEOS,
                PATIENTS,
            )
        )
    return aggregate(CFG, list(range(n_seeds)), runs), runs


def test_a_tiny_consistent_difference_below_the_noise_floor_is_never_a_win():
    # ours is better on every single image by 0.005 (per-image p ~ 1e-21) but seeds move the lower
    # bound by 0.03: within noise
    study, _ = _study(shift=0.005, lower_jitter=0.03)
    t = study["sites"]["telemed"]
    row = t["rows"]["lower"]
    assert row["p_image_dice"] < 1e-10
    assert t["noise_floor"] == pytest.approx(0.03, rel=1e-6)
    assert row["verdict"] == "within noise"


def test_a_large_difference_is_called_only_with_per_video_evidence():
    study, runs = _study(shift=0.08, lower_jitter=0.01)
    t = study["sites"]["telemed"]
    assert t["rows"]["lower"]["verdict"] == "ours better"
    # the per-video p is the paired Wilcoxon on the seed-averaged per-video means
    ours = np.mean([r["evaluation"]["telemed"]["per_video"][f"{OURS}/dice"] for r in runs], axis=0)
    low = np.mean([r["evaluation"]["telemed"]["per_video"]["lower/dice"] for r in runs], axis=0)
    assert t["rows"]["lower"]["p_video_dice"] == pytest.approx(wilcoxon(low, ours).pvalue)
    assert t["rows"]["lower"]["n_video"] == 12 and t["rows"]["lower"]["n_patient"] == 4
    # gap closed: (ours - lower) / (upper - lower) = 0.08 / 0.2
    assert t["gap"]["closed"] == pytest.approx(0.4, abs=1e-9)
    assert t["gap"]["closed_per_seed"] == pytest.approx([0.4] * 3, abs=1e-9)
    md = render_markdown(study)
    assert "ours better" in md and "closes **40 %**" in md


def test_one_seed_makes_no_call():
    study, _ = _study(shift=0.2, lower_jitter=0.0, n_seeds=1)
    t = study["sites"]["telemed"]
    assert t["noise_floor"] is None
    assert t["rows"]["lower"]["verdict"].startswith("no call")
    assert "no difference is called" in render_markdown(study)


def test_same_recipe_check_shows_the_per_image_test_overstating():
    study, _ = _study(shift=0.0, lower_jitter=0.004)
    same = study["sites"]["telemed"]["same_recipe"]
    assert same["p_image"] < 1e-6 and same["n_image"] == 120 and same["n_video"] == 12


@pytest.mark.parametrize(
    "delta,p,noise,n,expected",
    [
        (0.05, 0.01, 0.02, 3, "ours better"),
        (-0.05, 0.01, 0.02, 3, "ours worse"),
        (0.05, 0.2, 0.02, 3, "not significant per video"),
        (0.01, 1e-9, 0.02, 3, "within noise"),
        (0.05, 0.01, None, 1, "no call (1 seed: noise floor unknown)"),
    ],
)
def test_verdict(delta, p, noise, n, expected):
    assert verdict(delta, p, noise, n) == expected


def test_runs_over_different_sites_refuse_to_aggregate():
    _, runs = _study(shift=0.0, lower_jitter=0.01, n_seeds=2)
    runs[1]["evaluation"]["other"] = runs[1]["evaluation"].pop("telemed")
    with pytest.raises(ValueError, match="seed 1 evaluated sites"):
        aggregate(CFG, [0, 1], runs)
