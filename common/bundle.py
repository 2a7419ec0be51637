"""The fused model a target site keeps after evaluating it: both branches' weights, how to fuse
them, and how a frame becomes the model's input — one folder that `crossprobe segment` reads.

    <site output>/bundle/
      weights.safetensors   both branches, keys "<branch>.<parameter>"
      bundle.json           pair, fusion mode/normalisation/eps, threshold, preprocessing, run id,
                            config hash, the metrics this site measured on its own test frames,
                            how the site adapted the pair to its own frames (null: it did not)
      experiment.yaml       the experiment the models were trained under (rebuilds the network)

Nothing of it crosses the wire: the weights are the fine-tuned models the server sent for
evaluation; the card is written from what the site already has.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import arms
from common.config import ExperimentConfig, dump_experiment, load_experiment
from common.errors import UserError

FORMAT = "crossprobe-fused-bundle/1"
WEIGHTS, CARD, EXPERIMENT = "weights.safetensors", "bundle.json", "experiment.yaml"
# how a frame becomes the model's input (common/data/transforms.py), named for the card
PREPROCESSING = {
    "gray": "frames as 8-bit grey (colour converted with ITU-R 601 luma)",
    "pad": "zeros at the bottom and right to a square of the longer side",
    "resize": "bilinear with antialiasing to img_size x img_size",
    "channels": "the grey channel repeated 3 times, scaled to [0, 1], no mean/std",
}


class BundleError(UserError):
    """A bundle folder that is missing a file or does not describe a fused pair."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the experiment, the two branches' state dicts, and the card."""

    cfg: ExperimentConfig
    pair: tuple[str, str]
    states: dict[str, dict[str, torch.Tensor]]
    card: dict[str, Any]

    @property
    def mode(self) -> str:
        return str(self.card["fusion"]["mode"])


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(dump_experiment(cfg).encode()).hexdigest()[:16]


def save_bundle(
    folder: Path,
    cfg: ExperimentConfig,
    models: dict[str, dict[str, torch.Tensor]],
    metrics: dict[str, float],
    run_id: int | str | None = None,
    pair: tuple[str, str] = arms.MAIN_PAIR,
    adaptation: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle of ``pair`` (from ``models``) into ``folder``; returns the folder.

    ``metrics`` are this site's own scores of the pair (and its branches) on its test frames;
    ``adaptation`` how the site adapted the pair to its own frames (None: the paper's pair).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{b}.{k}": v.detach().cpu().contiguous() for b in pair for k, v in models[b].items()}
    save_file(flat, str(folder / WEIGHTS))
    (folder / EXPERIMENT).write_text(dump_experiment(cfg))
    fcfg = cfg.fusion
    card = {
        "format": FORMAT,
        "run_id": None if run_id is None else str(run_id),
        "experiment": cfg.name,
        "config_hash": config_hash(cfg),
        "pair": list(pair),
        # the configured mode; the report's Table 7 also shows the one source validation picks
        "fusion": {"mode": fcfg.default_mode, "normalize": fcfg.normalize, "eps": fcfg.eps},
        "threshold": fcfg.threshold,
        "img_size": cfg.model.img_size,
        "preprocessing": PREPROCESSING,
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "adaptation": adaptation,
    }
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return folder


def _branch(flat: dict[str, torch.Tensor], branch: str) -> dict[str, torch.Tensor]:
    prefix = f"{branch}."
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def load_bundle(folder: Path) -> Bundle:
    """Read a bundle folder.

    Raises:
        BundleError: a file is missing, the card is not a crossprobe bundle, or the weights do
            not hold both branches of its pair.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS, CARD, EXPERIMENT):
        if not (folder / name).is_file():
            raise BundleError(f"{folder / name}: missing (not a crossprobe bundle folder?)")
    try:
        card = json.loads((folder / CARD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{folder / CARD}: not JSON ({err})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else None
        raise BundleError(f"{folder / CARD}: format {got!r}, expected {FORMAT!r}")
    pair = tuple(card.get("pair", ()))
    if len(pair) != 2:
        raise BundleError(f"{folder / CARD}: key 'pair' must name two branches, got {pair!r}")
    flat = load_file(str(folder / WEIGHTS))
    states = {b: _branch(flat, b) for b in pair}
    for b, state in states.items():
        if not state:
            raise BundleError(f"{folder / WEIGHTS}: no weights for branch {b!r}")
    cfg = load_experiment(folder / EXPERIMENT)
    return Bundle(cfg, (str(pair[0]), str(pair[1])), states, card)
