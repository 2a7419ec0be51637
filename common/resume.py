"""Epoch-end checkpoints of a fit (common/engine.py): a stage killed part-way (a preempted GPU job,
a site's machine restarted, a study stopped at the end of a working day) goes on from its last
whole epoch and ends exactly where the uninterrupted fit would have, bit for bit.

The checkpoint holds everything the rest of the fit depends on: the weights, the optimiser's
state, the weight average, the counters and loss history, the best validation so far, and the
state of every random generator it draws from — torch's, numpy's, Python's and the stage's own
(its loader's order and, for SimMIM, its masks). The datasets draw their augmentations from
generators seeded by (seed, epoch, index), so they need nothing saved.

A fit that runs to its end leaves its final weights and result in the same file: a rerun of a
phase that was stopped after this fit finished takes them instead of training again (with the
generators where the finished fit left them, so what follows draws what it would have drawn).

Only a one-process fit resumes (in a multi-process stage each rank has generators of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILENAME = "resume.pt"


def fit_key(*parts: Any) -> str:
    """A digest of what a fit is (its config, branch or arm, data): a checkpoint is resumed only
    by the same fit, never by a fit of another experiment that writes to the same folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Resumable:
    """Where a fit keeps its epoch-end checkpoint, what fit it is, and the stage's generators."""

    path: Path
    key: str
    generators: tuple[torch.Generator, ...] = ()

    def save(self, fit_state: dict[str, Any]) -> None:
        """Write ``fit_state`` and every generator's state (atomically: a kill mid-write leaves
        the previous epoch's checkpoint)."""
        payload = {"key": self.key, "fit": fit_state, "rng": self._rng_states()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved fit state (``{"finished": ...}`` for a fit that ran to its end), with every
        generator put back where it was; None when there is no checkpoint of this fit."""
        if not self.path.is_file():
            return None
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if payload.get("key") != self.key:
            return None  # another fit's: overwritten at this fit's first epoch end
        self._restore_rng(payload["rng"])
        return payload["fit"]

    def _rng_states(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
            "generators": [g.get_state() for g in self.generators],
        }

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = rng["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if len(rng["generators"]) != len(self.generators):
            raise ValueError(
                f"{self.path}: {len(rng['generators'])} generator states for "
                f"{len(self.generators)} generators"
            )
        for g, state in zip(self.generators, rng["generators"], strict=True):
            g.set_state(state)
