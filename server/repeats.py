"""One seed's score as the mean of its fine-tuning repeats (``study.finetune_repeats``).

A seed pretrains once and fine-tunes every arm k times (``finetune.repeat`` 0…k−1: other initial
weights, batch order and augmentations). On the phantom most of the seed-to-seed spread of an arm is
fine-tuning noise that moves the whole model (docs/results.md, "The noise floor"), so the study
scores each arm by the mean over its repeats: every test image's score is averaged over the k runs,
and the seed's run is then treated as any other. The fusion mode is chosen again on the averaged
source-validation scores (paper Table 7), as one run would choose it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.config import ExperimentConfig
from server.report import fusion_selection
from server.study import UNITS

VECTORS = tuple(f"per_{unit}" for unit in UNITS)


def mean_over_repeats(cfg: ExperimentConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first repeat's ``results.json`` with every evaluation's score vectors and scalar
    metrics averaged over ``runs`` (the repeats of one seed, in order).

    Raises:
        ValueError: the repeats evaluated different jobs, methods or numbers of test frames.
    """
    if len(runs) == 1:
        return runs[0]
    evaluation = {
        job: _mean_entry(job, [r["evaluation"].get(job) for r in runs])
        for job in runs[0]["evaluation"]
    }
    return {
        **runs[0],
        "evaluation": evaluation,
        "fusion_selection": fusion_selection(cfg, evaluation),
        "finetune_repeats": len(runs),
    }


def _mean_entry(job: str, entries: list[dict[str, Any] | None]) -> dict[str, Any]:
    first = entries[0]
    assert first is not None

    def keys(e: dict[str, Any]) -> dict[str, list[str]]:
        return {f: sorted(e[f]) for f in VECTORS}

    for i, e in enumerate(entries[1:], 1):
        if e is None or keys(e) != keys(first):
            raise ValueError(f"repeat {i} evaluated other methods than repeat 0 in job {job!r}")
    out = dict(first)
    for field in VECTORS:
        out[field] = {}
        for key in first[field]:
            vecs = [e[field][key] for e in entries]  # type: ignore[index]
            if len({len(v) for v in vecs}) != 1:
                raise ValueError(
                    f"job {job!r}, {field} {key!r}: the repeats scored different numbers of "
                    f"{field.removeprefix('per_')}s {[len(v) for v in vecs]}"
                )
            out[field][key] = np.mean(np.asarray(vecs, dtype=float), axis=0).tolist()
    out["metrics"] = {
        k: float(np.mean([e["metrics"][k] for e in entries]))  # type: ignore[index]
        if isinstance(v, float) and all(k in e["metrics"] for e in entries)  # type: ignore[index]
        else v
        for k, v in first["metrics"].items()
    }
    return out
