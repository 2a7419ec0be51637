"""A seed's score as the mean of its fine-tuning repeats (server/repeats.py)."""

from __future__ import annotations

import pytest

from common.config import ExperimentConfig
from server.repeats import mean_over_repeats


def _run(lower: list[float], fused: list[float], val: list[float]) -> dict:
    def entry(split: str, scores: dict[str, list[float]]) -> dict:
        return {
            "role": "target" if split == "test" else "source",
            "site": "telemed" if split == "test" else "lumify",
            "split": split,
            "num_examples": len(next(iter(scores.values()))),
            "metrics": {f"{k}": sum(v) / len(v) for k, v in scores.items()} | {"n_videos": 2.0},
            "per_image": scores,
            "per_video": {k: [sum(v) / len(v)] * 2 for k, v in scores.items()},
            "per_patient": {k: [sum(v) / len(v)] for k, v in scores.items()},
        }

    return {
        "ours": "fusion-entropy",
        "evaluation": {
            "telemed": entry(
                "test",
                {"lower/dice": lower, "fusion-entropy/dice": fused, "fusion-mean/dice": fused},
            ),
            "lumify:val": entry("val", {f"fusion-{m}/dice": val for m in ("entropy", "mean")}),
        },
    }


def test_every_score_is_the_mean_of_the_repeats_and_the_fusion_mode_is_chosen_again():
    cfg = ExperimentConfig()
    runs = [_run([0.2, 0.4], [0.5, 0.5], [0.9]), _run([0.4, 0.8], [0.7, 0.3], [0.7])]
    merged = mean_over_repeats(cfg, runs)
    test = merged["evaluation"]["telemed"]
    assert test["per_image"]["lower/dice"] == pytest.approx([0.3, 0.6])
    assert test["metrics"]["lower/dice"] == pytest.approx(0.45)
    assert test["metrics"]["n_videos"] == 2.0
    assert merged["finetune_repeats"] == 2
    assert merged["fusion_selection"]["val_dice"]["entropy"] == pytest.approx(0.8)
    assert mean_over_repeats(cfg, runs[:1]) is runs[0]


def test_repeats_that_scored_other_frames_or_methods_are_refused():
    cfg = ExperimentConfig()
    with pytest.raises(ValueError, match="'telemed', per_image 'lower/dice'.*\\[2, 3\\]"):
        mean_over_repeats(cfg, [_run([0.2, 0.4], [0.5, 0.5], [0.9]),
                                _run([0.2, 0.4, 0.1], [0.5, 0.5], [0.9])])  # fmt: skip
    other = _run([0.2, 0.4], [0.5, 0.5], [0.9])
    del other["evaluation"]["telemed"]["per_image"]["fusion-entropy/dice"]
    with pytest.raises(ValueError, match="repeat 1 evaluated other methods.*'telemed'"):
        mean_over_repeats(cfg, [_run([0.2, 0.4], [0.5, 0.5], [0.9]), other])
