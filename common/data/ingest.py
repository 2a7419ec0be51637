"""Readers for the formats users have, and the importer/exporter to the canonical layout.

Readers (optional extras imported lazily: ``pip install crossprobe[ingest]``):
DICOM cine (pydicom; cropped to the ``SequenceOfUltrasoundRegions`` area, bounds clipped to the
image), MP4/AVI (PyAV), ITK-SNAP NIfTI label volumes (nibabel; ``(W, H, T)`` → ``(T, H, W)``,
never ``as_closest_canonical``), PNG folders (Pillow), and the authors' ``Images/`` + ``Masks/`` +
CSV (``filename, videoname, framenum``) layout, which :func:`export_authors` also writes.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.images import save_png
from common.data.manifest import (
    DataError,
    FrameRow,
    SiteData,
    frame_relpath,
    load_site,
    split_patients,
    write_site_files,
)

VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".m4v"}
IMAGE_EXT = {".png"}


@dataclass
class Cine:
    """A decoded video: grey frames (T, H, W) uint8 and what is known about them."""

    frames: np.ndarray
    source_file: str
    spacing_mm: tuple[float | None, float | None] = (None, None)
    time_ms: list[float] | None = None
    crop: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) applied to the full grid
    full_shape: tuple[int, int] | None = None  # (H, W) before cropping
    patient_id: str | None = None
    names: list[str] | None = None  # per-frame source names (PNG folders)
    meta: dict[str, Any] = field(default_factory=dict)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    """(..., H, W) or (..., H, W, 3|4) → (..., H, W) uint8 (ITU-R 601 luma for colour)."""
    if arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float32)
        arr = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255)
    return arr.astype(np.uint8)


def read_dicom_cine(path: str | Path) -> Cine:
    """A DICOM (cine) ultrasound file → grey frames cropped to its ultrasound region.

    The first 2-D region of ``SequenceOfUltrasoundRegions`` gives the image area and its physical
    deltas (cm → mm); region bounds beyond the image are clipped to it.

    Raises:
        DataError: not readable as DICOM, no pixel data, or an empty region after clipping.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
    except Exception as err:  # pydicom raises many types for bad files
        raise DataError(f"{path}: cannot read DICOM pixel data: {err}") from None
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n == 1 and arr.ndim == (3 if spp > 1 else 2):
        arr = arr[None]
    frames = _to_gray(arr)
    T, H, W = frames.shape
    y0, y1, x0, x1 = 0, H, 0, W
    sx = sy = None
    for reg in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        if int(getattr(reg, "RegionSpatialFormat", 0)) != 1:
            continue
        x0 = max(0, min(W, int(reg.RegionLocationMinX0)))
        y0 = max(0, min(H, int(reg.RegionLocationMinY0)))
        x1 = max(0, min(W, int(reg.RegionLocationMaxX1) + 1))
        y1 = max(0, min(H, int(reg.RegionLocationMaxY1) + 1))
        scale = {3: 10.0}.get(int(getattr(reg, "PhysicalUnitsXDirection", 0)))
        if scale is not None:
            sx = float(reg.PhysicalDeltaX) * scale
            sy = float(reg.PhysicalDeltaY) * scale
        break
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{path}: ultrasound region is empty after clipping to the image")
    ft = getattr(ds, "FrameTime", None)
    times = [i * float(ft) for i in range(T)] if ft not in (None, "") else None
    pid = str(getattr(ds, "PatientID", "") or "") or None
    return Cine(
        frames=np.ascontiguousarray(frames[:, y0:y1, x0:x1]),
        source_file=str(path),
        spacing_mm=(sx, sy),
        time_ms=times,
        crop=(y0, y1, x0, x1),
        full_shape=(H, W),
        patient_id=pid,
    )


def read_video(path: str | Path) -> Cine:
    """An MP4/AVI/… file → grey frames (PyAV; H.264, MJPEG, FFV1 …). Raises DataError."""
    import av

    path = Path(path)
    frames, times = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for fr in container.decode(stream):
                frames.append(fr.to_ndarray(format="gray"))
                times.append(float(fr.time) * 1000.0 if fr.time is not None else float("nan"))
    except Exception as err:  # av raises its own error hierarchy
        raise DataError(f"{path}: cannot decode video: {err}") from None
    if not frames:
        raise DataError(f"{path}: no video frames")
    arr = np.stack(frames).astype(np.uint8)
    t0 = times[0] if np.isfinite(times[0]) else 0.0
    return Cine(
        frames=arr,
        source_file=str(path),
        time_ms=[round(t - t0, 3) for t in times],
        full_shape=arr.shape[1:],
    )


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def read_png_folder(folder: str | Path) -> Cine:
    """A folder of PNG frames (natural sort order) → grey frames. Raises DataError."""
    from common.data.datasets import read_png

    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT), key=_natural_key)
    if not files:
        raise DataError(f"{folder}: no PNG frames")
    frames = [read_png(p) for p in files]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DataError(f"{folder}: frames differ in size {sorted(shapes)}")
    return Cine(
        frames=np.stack(frames),
        source_file=str(folder),
        full_shape=frames[0].shape,
        names=[p.name for p in files],
    )


def read_nifti_labels(path: str | Path, video_shape: tuple[int, int, int]) -> np.ndarray:
    """An ITK-SNAP label volume on the video's grid → (T, H, W) uint8.

    nibabel's ``np.asarray(img.dataobj)`` is (W, H, T); it is transposed (2, 1, 0). The volume is
    never reoriented (``as_closest_canonical`` would flip x/y and misalign the masks).

    Raises:
        DataError: unreadable, or its shape (as (T, H, W)) differs from ``video_shape``.
    """
    import nibabel as nib

    path = Path(path)
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as err:
        raise DataError(f"{path}: cannot read NIfTI: {err}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D (W, H, T) label volume, got shape {data.shape}")
    vol = data.transpose(2, 1, 0)
    if tuple(vol.shape) != tuple(video_shape):
        raise DataError(
            f"{path}: label volume shape (T, H, W) = {tuple(vol.shape)} does not match the video "
            f"{tuple(video_shape)}"
        )
    if vol.min() < 0 or vol.max() > 255:
        raise DataError(f"{path}: label values outside 0–255")
    return np.ascontiguousarray(vol.astype(np.uint8))


def read_any(path: str | Path) -> Cine:
    """Dispatch on the path: a folder of PNGs, a video file, or DICOM."""
    path = Path(path)
    if path.is_dir():
        return read_png_folder(path / "images" if (path / "images").is_dir() else path)
    if not path.exists():
        raise DataError(f"{path}: missing file")
    if path.suffix.lower() in VIDEO_EXT:
        return read_video(path)
    return read_dicom_cine(path)


def _label_file(src: Path) -> Path | None:
    stem = src.name[: -len("".join(src.suffixes))] if src.suffixes and src.is_file() else src.name
    for cand in (f"{stem}.nii.gz", f"{stem}.nii", f"{stem}_seg.nii.gz", f"{stem}-label.nii.gz"):
        p = src.parent / cand
        if p.is_file() and p != src:
            return p
    return None


def _safe_id(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("._")
    return s or "x"


def _require_empty(out: Path) -> None:
    """Raise DataError when ``out`` exists and holds anything."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty")


def _real_site_meta(
    name: str, role: str, device: str, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The ``dataset.yaml`` of an imported real site (binary bone labels, as annotated)."""
    return {
        "name": name,
        "role": role,
        "domain": role,
        "device": device,
        "labels": {0: "background", 1: "bone"},
        "mask": {"semantics": "as annotated"},
        "provenance": provenance,
    }


@dataclass
class _Video:
    """One ingest input: its ids, decoded frames, label maps by frame index, and source path."""

    patient_id: str
    video_id: str
    cine: Cine
    labels: dict[int, np.ndarray]
    src: Path


def _nifti_labels(label_file: Path, cine: Cine, all_labeled: bool) -> dict[int, np.ndarray]:
    """Label maps from a NIfTI volume on the video's full grid, cropped like the video; a frame
    counts when its slice is non-zero (every frame if ``all_labeled``)."""
    full = (cine.frames.shape[0], *(cine.full_shape or cine.frames.shape[1:]))
    vol = read_nifti_labels(label_file, full)
    if cine.crop is not None:
        y0, y1, x0, x1 = cine.crop
        vol = vol[:, y0:y1, x0:x1]
    return {t: vol[t] for t in range(vol.shape[0]) if all_labeled or vol[t].any()}


def _mask_folder_labels(src: Path, cine: Cine) -> dict[int, np.ndarray]:
    """Label maps from ``src/masks/<frame file name>`` (frames without one are unlabeled).

    Raises:
        DataError: a mask's size differs from the frames'.
    """
    from common.data.datasets import read_png

    labels = {}
    for t, nm in enumerate(cine.names or []):
        mp = src / "masks" / nm
        if mp.is_file():
            m = read_png(mp, mode="raw")
            if m.shape != cine.frames.shape[1:]:
                raise DataError(
                    f"{mp}: mask size {m.shape[::-1]} != frame size {cine.frames.shape[2:0:-1]}"
                )
            labels[t] = m
    return labels


def _read_input(src: Path, all_labeled: bool) -> _Video:
    """Decode one ingest input and find its labels (a NIfTI next to a video file, or a PNG
    folder's ``masks/``); ids come from the DICOM PatientID or the parent folder, and the name."""
    cine = read_any(src)
    pid = _safe_id(cine.patient_id or src.resolve().parent.name)
    vid = _safe_id(src.name.split(".")[0] if src.is_file() else src.name)
    labels = None
    lf = _label_file(src) if src.is_file() else None
    if lf is not None:
        labels = _nifti_labels(lf, cine, all_labeled)
    elif src.is_dir() and (src / "masks").is_dir() and cine.names:
        labels = _mask_folder_labels(src, cine)
    return _Video(pid, vid, cine, labels or {}, src)


def _assign_splits(
    videos: list[_Video], split: str, seed: int, fractions: tuple[float, float, float]
) -> dict[str, str]:
    """Patient → split: by ``seed`` and ``fractions`` for "auto", else ``split`` for everyone.

    Raises:
        DataError: two inputs give the same (patient, video) ids.
    """
    keys = [(v.patient_id, v.video_id) for v in videos]
    if len(set(keys)) != len(keys):
        raise DataError(f"inputs give duplicate (patient, video) ids: {sorted(keys)}")
    patients = [v.patient_id for v in videos]
    if split == "auto":
        return split_patients(patients, seed, fractions)
    return {p: split for p in patients}


def _write_video(out: Path, video: _Video, split: str, device: str) -> list[FrameRow]:
    """Write one video's frames and label maps as PNGs under ``out``; its manifest rows."""
    pid, vid, cine, labels = video.patient_id, video.video_id, video.cine, video.labels
    rows = []
    for t in range(cine.frames.shape[0]):
        img_rel = frame_relpath("frames", pid, vid, t)
        save_png(cine.frames[t], out / img_rel)
        mask_rel = ""
        if t in labels:
            mask_rel = frame_relpath("masks", pid, vid, t)
            save_png(labels[t], out / mask_rel)
        rows.append(
            FrameRow(
                patient_id=pid,
                video_id=vid,
                frame_index=t,
                image_path=img_rel,
                mask_path=mask_rel,
                labeled=t in labels,
                split=split,
                device=device,
                time_ms=cine.time_ms[t] if cine.time_ms else None,
                spacing_x_mm=cine.spacing_mm[0],
                spacing_y_mm=cine.spacing_mm[1],
                source_file=str(video.src),
                source_frame=t,
            )
        )
    return rows


def ingest(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    name: str,
    role: str,
    device: str = "",
    split: str = "auto",
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.68, 0.16, 0.16),
    all_labeled: bool = False,
    command: str = "",
) -> Path:
    """Convert real videos to a canonical site folder.

    Each input is one video: a DICOM cine, a video file, or a PNG folder (with optional
    ``images/`` + ``masks/`` sub-folders, masks by file name). Labels: a NIfTI next to a video file
    (``<stem>.nii.gz``, ``<stem>.nii``, ``<stem>_seg.nii.gz``, ``<stem>-label.nii.gz``), cropped
    like the video. A frame counts as labeled when its label slice is non-zero (ITK-SNAP cannot
    tell "not annotated" from "no bone"), or every frame of a labeled video if ``all_labeled``.
    Patient id: the DICOM PatientID, else the input's parent folder name. ``split`` "auto"
    assigns patients by ``seed`` and ``fractions``; otherwise every video goes to that split.

    Raises:
        DataError: unreadable input, label volume shape mismatch, ``out_dir`` not empty.
    """
    out = Path(out_dir)
    _require_empty(out)
    if split not in ("auto", "train", "val", "test"):
        raise DataError(f"split must be auto|train|val|test (got {split!r})")
    videos = [_read_input(src, all_labeled) for src in map(Path, inputs)]
    splits = _assign_splits(videos, split, seed, fractions)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for v in videos for r in _write_video(out, v, splits[v.patient_id], device)]
    provenance = {
        "ingest": command or "crossprobe data ingest",
        "inputs": [str(s) for s in inputs],
    }
    write_site_files(out, _real_site_meta(name, role, device, provenance), rows)
    return out


# --- the authors' layout: Images/ + Masks/ + CSV (filename, videoname, framenum) --------------

AUTHORS_COLUMNS = ("filename", "videoname", "framenum")


def export_authors(site: SiteData | str | Path, out_dir: str | Path) -> Path:
    """Write a site in the authors' layout (``yuyue2uofa/CrossDomainPOCUS``).

    ``Images/<patient>_<video>_<frame:05d>.png``, ``Masks/<same name>`` for labeled frames (uint8
    labels; their loader binarises ≥ 1), and one CSV per split (``train.csv``, ``val.csv``,
    ``test.csv``: every frame) plus ``<split>_labeled.csv`` (frames with masks), columns
    ``filename, videoname, framenum``.
    """
    site = site if isinstance(site, SiteData) else load_site(site)
    out = Path(out_dir)
    (out / "Images").mkdir(parents=True, exist_ok=True)
    (out / "Masks").mkdir(parents=True, exist_ok=True)
    per: dict[str, list[list[str]]] = {}
    for r in site.rows:
        fname = f"{r.patient_id}_{r.video_id}_{r.frame_index:05d}.png"
        shutil.copyfile(site.path(r.image_path), out / "Images" / fname)
        rec = [fname, f"{r.patient_id}_{r.video_id}", str(r.frame_index)]
        per.setdefault(r.split, []).append(rec)
        if r.labeled:
            shutil.copyfile(site.path(r.mask_path), out / "Masks" / fname)
            per.setdefault(f"{r.split}_labeled", []).append(rec)
    for key, recs in sorted(per.items()):
        with (out / f"{key}.csv").open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(AUTHORS_COLUMNS)
            w.writerows(recs)
    return out


def _authors_csvs(src: Path) -> list[tuple[Path, str]]:
    """(CSV, split) of the authors' split files in ``src``, sorted; ``*_labeled.csv`` files are
    skipped (they repeat frames) and so are CSVs named after no split.

    Raises:
        DataError: ``src`` holds no CSV at all.
    """
    csvs = sorted(p for p in src.glob("*.csv") if not p.stem.endswith("_labeled"))
    if not csvs:
        raise DataError(f"{src}: no CSV files")
    found = []
    for cp in csvs:
        sp = next((s for s in ("train", "val", "test") if s in cp.stem.lower()), None)
        if sp is not None:
            found.append((cp, sp))
    return found


def _import_authors_csv(
    cp: Path, split: str, src: Path, out: Path, device: str, patient_sep: str
) -> list[FrameRow]:
    """Copy the frames (and masks) one authors' CSV lists into ``out``; their manifest rows.

    Raises:
        DataError: missing columns, a bad frame number, a missing image.
    """
    rows = []
    with cp.open(newline="") as fh:
        rd = csv.DictReader(fh)
        miss = [c for c in AUTHORS_COLUMNS if c not in (rd.fieldnames or [])]
        if miss:
            raise DataError(f"{cp}: missing column(s) {miss}")
        for i, rec in enumerate(rd):
            where = f"{cp} row {i + 2}"
            rows.append(_import_authors_frame(rec, where, split, src, out, device, patient_sep))
    return rows


def _import_authors_frame(
    rec: dict[str, str],
    where: str,
    split: str,
    src: Path,
    out: Path,
    device: str,
    patient_sep: str,
) -> FrameRow:
    """Copy one CSV record's image (and mask, if ``Masks/`` has it) into ``out``; its row."""
    vn = rec["videoname"].strip()
    pid, _, vid = vn.partition(patient_sep) if patient_sep else (vn, "", "")
    pid, vid = _safe_id(pid), _safe_id(vid or vn)
    try:
        t = int(float(rec["framenum"]))
    except ValueError:
        raise DataError(f"{where}: bad framenum {rec['framenum']!r}") from None
    img = src / "Images" / rec["filename"]
    if not img.is_file():
        raise DataError(f"{where}: missing file {img}")
    msk = src / "Masks" / rec["filename"]
    img_rel = frame_relpath("frames", pid, vid, t)
    _copy_into(img, out / img_rel)
    mask_rel = ""
    if msk.is_file():
        mask_rel = frame_relpath("masks", pid, vid, t)
        _copy_into(msk, out / mask_rel)
    return FrameRow(
        patient_id=pid,
        video_id=vid,
        frame_index=t,
        image_path=img_rel,
        mask_path=mask_rel,
        labeled=bool(mask_rel),
        split=split,
        device=device,
        source_file=str(Path("Images") / rec["filename"]),
        source_frame=t,
    )


def _copy_into(src: Path, dst: Path) -> None:
    """Copy a file's bytes to ``dst``, creating its folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def import_authors(
    src_dir: str | Path,
    out_dir: str | Path,
    name: str,
    role: str,
    device: str = "",
    patient_sep: str = "_",
) -> Path:
    """Convert the authors' layout into a canonical site.

    Reads every ``*.csv`` in ``src_dir`` whose name contains train/val/test (``*_labeled.csv``
    files are skipped, they repeat frames); a frame is labeled when ``Masks/<filename>`` exists.
    Patient id = ``videoname`` up to the first ``patient_sep`` (the whole name if absent); video
    id = the rest.

    Raises:
        DataError: missing Images/, a CSV without the columns, a missing image, duplicate frames.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    if not (src / "Images").is_dir():
        raise DataError(f"{src / 'Images'}: missing (not the authors' layout)")
    _require_empty(out)
    rows: list[FrameRow] = []
    for cp, sp in _authors_csvs(src):
        rows += _import_authors_csv(cp, sp, src, out, device, patient_sep)
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise DataError(f"{src}: the CSVs list frames more than once, e.g. {dup}")
    provenance = {"ingest": "authors layout", "source": str(src)}
    write_site_files(out, _real_site_meta(name, role, device, provenance), rows)
    return out
