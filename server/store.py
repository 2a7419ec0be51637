"""The server's run folder: completed phases, received weights, metrics — written atomically.

Layout (``run_dir``)::

    config.yaml              the experiment this run used
    phases.json              {"fingerprint": ...,
                              "completed": [{"phase", "seconds", "bytes_*", ...}]}
    phases/<phase>/<key>.safetensors  averaged weights a phase produced (one file per branch / arm)
    phases/<phase>/metrics.json       what the sites reported in that phase (scalars, score vectors)
    results.json, report.md  written last, only when the whole run completed
    FAILED.json              why the last attempt stopped (removed when a later attempt completes)

A rerun with the same run folder skips every phase in ``phases.json`` whose inputs (config
sections and site data) are unchanged; the first changed phase and all after it run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from common.fl.weights_file import write_safetensors


class RunDirError(RuntimeError):
    """The run folder belongs to another experiment or is damaged."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class RunStore:
    """Persist and reload completed phases of one run.

    ``identity`` names the experiment and its sites: a folder of another experiment is refused.
    Each completed phase keeps the fingerprint of what determined its result (the config sections
    it used and the data of the sites it used); a phase is reused only under the same one.
    """

    def __init__(self, run_dir: Path, identity: str):
        self.run_dir = Path(run_dir)
        self.identity = identity
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._index_path = self.run_dir / "phases.json"
        self.index = self._load_index()

    def _load_index(self) -> dict[str, Any]:
        if not self._index_path.exists():
            return {"fingerprint": self.identity, "completed": []}
        try:
            index = json.loads(self._index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(
                f"{self._index_path}: damaged ({err}); delete the run folder"
            ) from None
        if index.get("fingerprint") != self.identity:
            raise RunDirError(
                f"{self.run_dir} holds a run of a different experiment or run settings "
                f"(fingerprint {index.get('fingerprint')} != {self.identity}); choose another "
                "run folder or delete this one to start over"
            )
        return index

    def completed(self) -> list[str]:
        return [c["phase"] for c in self.index["completed"]]

    def is_done(self, phase: str) -> bool:
        return phase in self.completed()

    def inputs_of(self, phase: str) -> str:
        """The fingerprint a completed phase was computed under ("" for an older run folder)."""
        return str(self.record(phase).get("inputs", ""))

    def forget_from(self, phase: str) -> list[str]:
        """Mark ``phase`` and every phase completed after it as not done; returns their names."""
        names = self.completed()
        dropped = names[names.index(phase) :] if phase in names else []
        self.index["completed"] = [c for c in self.index["completed"] if c["phase"] not in dropped]
        atomic_write_json(self._index_path, self.index)
        for name in dropped:  # their outputs must not mix with the recomputed ones
            shutil.rmtree(self.phase_dir(name), ignore_errors=True)
        return dropped

    def phase_dir(self, phase: str) -> Path:
        return self.run_dir / "phases" / phase

    def save_phase(
        self,
        phase: str,
        weights: Mapping[str, ArrayRecord],
        metrics: dict[str, Any],
        record: dict[str, Any],
    ) -> None:
        """Write the phase's outputs, then (last) mark it completed in ``phases.json``. The
        weights are written from the bytes they arrived as (no tensor copies)."""
        d = self.phase_dir(phase)
        d.mkdir(parents=True, exist_ok=True)
        for key, arrays in weights.items():
            tmp = d / f".{key}.safetensors.tmp"
            write_safetensors(tmp, arrays)
            os.replace(tmp, d / f"{key}.safetensors")
        atomic_write_json(d / "metrics.json", metrics)
        self.index["completed"] = [c for c in self.index["completed"] if c["phase"] != phase]
        self.index["completed"].append({"phase": phase, **record})
        atomic_write_json(self._index_path, self.index)

    def load_weights(self, phase: str) -> dict[str, dict[str, torch.Tensor]]:
        d = self.phase_dir(phase)
        return {
            p.name.removesuffix(".safetensors"): load_file(str(p))
            for p in sorted(d.glob("*.safetensors"))
        }

    def load_metrics(self, phase: str) -> dict[str, Any]:
        return json.loads((self.phase_dir(phase) / "metrics.json").read_text())

    def record(self, phase: str) -> dict[str, Any]:
        return next(c for c in self.index["completed"] if c["phase"] == phase)

    def adopt(self, other: RunStore, phase: str) -> bool:
        """Take ``other``'s completed ``phase`` (its outputs and record) unless this run already
        holds it computed on the same inputs; a run here then resumes after it. Returns whether
        anything was copied. Both runs must be of the same experiment (the same identity).

        Raises:
            RunDirError: ``other`` is of another experiment, or has not completed ``phase``.
        """
        if other.identity != self.identity:
            raise RunDirError(f"{other.run_dir} holds another experiment than {self.run_dir}")
        if not other.is_done(phase):
            raise RunDirError(f"{other.run_dir} has not completed phase {phase!r}")
        if self.is_done(phase) and self.inputs_of(phase) == other.inputs_of(phase):
            return False
        self.forget_from(phase)
        shutil.copytree(other.phase_dir(phase), self.phase_dir(phase))
        self.index["completed"].append(other.record(phase))
        atomic_write_json(self._index_path, self.index)
        return True
