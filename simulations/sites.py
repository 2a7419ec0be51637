"""Materialise a simulated site: render the phantom and write the canonical layout.

``synth_site`` writes ``dataset.yaml``, ``manifest.csv``, ``frames/`` and ``masks/`` exactly as
``docs/data.md`` says, through the same writers the real-data ingest uses. ``ensure_site``
is what the simulation calls: it generates a site only when it is absent or was made from another
config, writing into a temporary folder that is renamed at the end so a crash never leaves a half
site that looks complete. Same seed ⇒ byte-identical files.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, SiteConfig, SynthConfig
from common.data.images import save_png
from common.data.manifest import (
    DataError,
    FrameRow,
    frame_relpath,
    load_site,
    split_patients,
    write_site_files,
)
from simulations.phantom.device import get_device, get_operator, get_site_preset
from simulations.phantom.geometry import LABELS, sample_anatomy
from simulations.phantom.render import VideoSpec, frame_shape, render_video

GENERATOR = "crossprobe.phantom"
GENERATOR_VERSION = 2  # 2: no FFT wrap-around at the frame's edges; annotation_noise
_IN_PROCESS_FRAMES = 400  # below this many frames, worker start-up costs more than it saves


@dataclass(frozen=True)
class VideoJob:
    patient_id: str
    video_id: str
    view: str
    split: str
    labeled_every: int  # 1 = every frame, n = every n-th frame, 0 = none
    spec: VideoSpec


def _labeled_every(role: str, split: str, synth: SynthConfig) -> int:
    if role == "source":
        return 1
    if split == "train" and not synth.target_train_labels:
        return 0
    return synth.label_every


def site_difficulty(synth: SynthConfig) -> float:
    """How hard the site's frames are to read: its own ``difficulty``, else its preset's."""
    if synth.difficulty is not None:
        return synth.difficulty
    return get_site_preset(synth.preset).difficulty


def plan_site(site: SiteConfig, img_size: int) -> list[VideoJob]:
    """The videos of a synthetic site (patients, views, splits, seeds), without rendering."""
    synth = site.synth
    if synth is None:
        raise ValueError(f"site {site.name!r} has no synth config")
    try:
        preset = get_site_preset(synth.preset)
    except KeyError as err:
        raise ConfigError(f"site {site.name!r}: synth.preset: {err.args[0]}") from None
    dev, op = get_device(preset.device), get_operator(preset.operator)
    size = int(synth.img_size or img_size)
    rng = np.random.default_rng(np.random.SeedSequence([synth.seed, 0]))
    patients = [f"p{i:03d}" for i in range(synth.patients)]
    fr = (1.0 - synth.val_fraction - synth.test_fraction, synth.val_fraction, synth.test_fraction)
    if fr[0] <= 0:
        raise ConfigError(
            f"site {site.name!r}: synth.val_fraction + synth.test_fraction must be < 1"
        )
    splits = split_patients(patients, synth.seed, fr)
    jobs = []
    for pi, pid in enumerate(patients):
        age = float(rng.uniform(4.0, 16.0))
        first = int(rng.integers(len(preset.views)))
        for v in range(synth.videos_per_patient):
            view = preset.views[(first + v) % len(preset.views)]
            arng = np.random.default_rng(np.random.SeedSequence([synth.seed, 2, pi, v]))
            anat = sample_anatomy(arng, view, dev.fov_w_mm, age=age, fracture_p=preset.fracture_p)
            spec = VideoSpec(
                anatomy=anat,
                device=dev,
                operator=op,
                n_frames=synth.frames_per_video,
                img_size=size,
                seed=(synth.seed, 3, pi, v),
                difficulty=site_difficulty(synth),
                annotation_noise=synth.annotation_noise,
                band_mm=synth.band_mm if synth.mask == "band" else None,
            )
            split = splits[pid]
            jobs.append(
                VideoJob(
                    pid, f"v{v:02d}", view, split, _labeled_every(site.role, split, synth), spec
                )
            )
    return jobs


def _run_job(args: tuple[VideoJob, str]) -> tuple[list[FrameRow], float]:
    job, out = args
    root = Path(out)
    vid = render_video(job.spec)
    rows = []
    for t in range(job.spec.n_frames):
        img_rel = frame_relpath("frames", job.patient_id, job.video_id, t)
        save_png(vid.frames[t], root / img_rel)
        labeled = job.labeled_every > 0 and t % job.labeled_every == 0
        mask_rel = ""
        if labeled:
            mask_rel = frame_relpath("masks", job.patient_id, job.video_id, t)
            save_png(vid.labels[t], root / mask_rel)
        rows.append(
            FrameRow(
                patient_id=job.patient_id,
                video_id=job.video_id,
                frame_index=t,
                image_path=img_rel,
                mask_path=mask_rel,
                labeled=labeled,
                split=job.split,
                view=job.view,
                device=job.spec.device.name,
                time_ms=round(t * vid.frame_ms, 3),
                spacing_x_mm=vid.spacing_mm[0],
                spacing_y_mm=vid.spacing_mm[1],
                source_file="",
                source_frame=t,
            )
        )
    return rows, vid.mm_per_frame


class Progress:
    """A one-line progress report on stderr: done / total, frames/s, ETA."""

    def __init__(self, label: str, total: int, frames_total: int, enabled: bool = True):
        self.label, self.total, self.frames_total, self.enabled = (
            label,
            total,
            frames_total,
            enabled,
        )
        self.done = self.frames = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, frames: int) -> None:
        self.done += 1
        self.frames += frames
        now = time.perf_counter()
        if not self.enabled or (self.done < self.total and now - self._last < 0.5):
            return
        self._last = now
        dt = max(now - self.t0, 1e-9)
        fps = self.frames / dt
        eta = (self.frames_total - self.frames) / fps if fps > 0 else float("nan")
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(
            f"\r[{self.label}] videos {self.done}/{self.total}  frames {self.frames}/"
            f"{self.frames_total}  {fps:.1f} frames/s  ETA {eta:.0f}s  {end}"
        )
        sys.stderr.flush()

    @property
    def fps(self) -> float:
        return self.frames / max(time.perf_counter() - self.t0, 1e-9)


def _provenance(site: SiteConfig, img_size: int) -> dict[str, Any]:
    assert site.synth is not None
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": site.synth.seed,
        "img_size": int(site.synth.img_size or img_size),
        "synth": site.synth.model_dump(mode="json"),
        "difficulty": site_difficulty(site.synth),  # the preset's when synth leaves it unset
    }


def _render_jobs(
    jobs: list[VideoJob], out: Path, workers: int, prog: Progress
) -> list[tuple[list[FrameRow], float]]:
    """Render and write every job's video under ``out``, in job order; (rows, mm per frame) each.

    Small sites are rendered in this process; larger ones in a pool of ``workers`` processes.
    """
    n_frames = sum(j.spec.n_frames for j in jobs)
    results: list[tuple[list[FrameRow], float]] = []
    args = [(j, str(out)) for j in jobs]
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1 or n_frames < _IN_PROCESS_FRAMES:
        for a in args:
            results.append(_run_job(a))
            prog.update(len(results[-1][0]))
    else:
        # fork: no re-import of the caller's __main__ (spawn would need a main guard); the
        # workers use numpy/scipy/Pillow only, never torch
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for res in pool.imap(_run_job, args):
                results.append(res)
                prog.update(len(res[0]))
    return results


def _site_meta(site: SiteConfig, img_size: int, steps: list[float]) -> dict[str, Any]:
    """The ``dataset.yaml`` of a synthetic site; ``steps``: each video's sweep mm per frame."""
    assert site.synth is not None
    preset = get_site_preset(site.synth.preset)
    dev = get_device(preset.device)
    h, w = frame_shape(dev, int(site.synth.img_size or img_size))
    return {
        "name": site.name,
        "role": site.role,
        "domain": site.role,
        "device": dev.name,
        "labels": {0: "background", **LABELS},
        "mask": {"semantics": site.synth.mask, "band_mm": site.synth.band_mm},
        "frame_size": [h, w],
        "sweep_mm_per_frame": {
            "mean": round(float(np.mean(steps)), 4),
            "min": round(float(np.min(steps)), 4),
            "max": round(float(np.max(steps)), 4),
        },
        "provenance": _provenance(site, img_size),
    }


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``; an existing ``out_dir`` is moved aside
    first and deleted only after the swap."""
    if out_dir.exists():  # overwrite: move the old one aside first, then swap
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def synth_site(
    site: SiteConfig,
    img_size: int,
    out_dir: Path,
    workers: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Render ``site.synth`` into the canonical layout at ``out_dir`` and return ``out_dir``.

    Frames are ``synth.img_size or img_size`` px wide (height from the device's field of view).
    Videos are rendered in ``workers`` processes; the result does not depend on ``workers``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (overwrite it explicitly)")
    jobs = plan_site(site, img_size)
    assert site.synth is not None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        n_frames = sum(j.spec.n_frames for j in jobs)
        prog = Progress(f"synth {site.name}", len(jobs), n_frames, progress)
        results = _render_jobs(jobs, tmp, workers, prog)
        rows = [r for rs, _ in results for r in rs]
        steps = [m for _, m in results]
        write_site_files(tmp, _site_meta(site, img_size, steps), rows)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _matches(site_dir: Path, site: SiteConfig, img_size: int) -> bool | None:
    """True: a finished site made from this config; False: ours but stale; None: not ours."""
    import yaml

    y = site_dir / "dataset.yaml"
    if not y.is_file() or not (site_dir / "manifest.csv").is_file():
        return None
    try:
        meta = yaml.safe_load(y.read_text()) or {}
    except yaml.YAMLError:
        return None
    prov = meta.get("provenance") or {}
    if prov.get("generator") != GENERATOR:
        return None
    return prov == _provenance(site, img_size)


def ensure_site(
    site: SiteConfig, img_size: int, root: Path, workers: int = 2, progress: bool = True
) -> Path:
    """The folder of ``site``'s data, generating it under ``root/<site.name>`` if needed.

    ``site.data_dir`` (real or prepared data) is returned as is, after a manifest check. A synthetic
    site is regenerated when absent or made from another synth config / image size.

    Raises:
        DataError: ``data_dir`` is not a canonical site, or ``root/<name>`` holds something that
            this generator did not make (it is never deleted).
    """
    if site.data_dir:
        p = Path(site.data_dir)
        load_site(p, check="none")
        return p
    out = Path(root) / site.name
    state = _matches(out, site, img_size)
    if state is True:
        return out
    if out.exists() and state is None:
        raise DataError(
            f"{out}: exists but is not a site made by {GENERATOR}; move it away or set data_dir"
        )
    try:
        return synth_site(
            site, img_size, out, workers=workers, progress=progress, overwrite=out.exists()
        )
    except FileExistsError:  # another process finished it first
        if _matches(out, site, img_size):
            return out
        raise
