"""The canonical site layout: ``dataset.yaml`` + ``manifest.csv`` + ``frames/`` + ``masks/``.

One folder per site (``docs/data.md``, "Canonical on-disk layout"). The synthetic generator
and every ingest reader write it through :func:`write_site_files`; every consumer reads it through
:func:`load_site`, which validates it and raises :class:`DataError` with one message naming the
file and the manifest row.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import yaml

from common.errors import UserError

COLUMNS: tuple[str, ...] = (
    "patient_id",
    "video_id",
    "frame_index",
    "image_path",
    "mask_path",
    "labeled",
    "split",
    "view",
    "device",
    "time_ms",
    "spacing_x_mm",
    "spacing_y_mm",
    "source_file",
    "source_frame",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
Check = Literal["none", "headers", "full"]


class DataError(UserError):
    """A user-caused data problem; the message names the file (and manifest row)."""


@dataclass(frozen=True)
class FrameRow:
    """One manifest row. Paths are relative to the site folder; ``mask_path`` is "" if unlabeled."""

    patient_id: str
    video_id: str
    frame_index: int
    image_path: str
    mask_path: str = ""
    labeled: bool = False
    split: str = "train"
    view: str = ""
    device: str = ""
    time_ms: float | None = None
    spacing_x_mm: float | None = None
    spacing_y_mm: float | None = None
    source_file: str = ""
    source_frame: int | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.patient_id, self.video_id, self.frame_index)


def frame_relpath(kind: str, patient: str, video: str, frame_index: int) -> str:
    """``frames/<patient>/<video>/<frame_index:05d>.png`` (kind = "frames" or "masks")."""
    return f"{kind}/{patient}/{video}/{frame_index:05d}.png"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_manifest(path: Path, rows: Iterable[FrameRow]) -> None:
    """Write ``manifest.csv`` (columns :data:`COLUMNS`, "\\n" line ends, deterministic)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt(getattr(r, c)) for c in COLUMNS])
    Path(path).write_text(buf.getvalue())


def write_dataset_yaml(path: Path, meta: dict[str, Any]) -> None:
    """Write ``dataset.yaml`` (key order kept, so same input ⇒ same bytes)."""
    Path(path).write_text(yaml.safe_dump(meta, sort_keys=False))


def write_site_files(site_dir: Path, meta: dict[str, Any], rows: Sequence[FrameRow]) -> None:
    """Write the manifest first and ``dataset.yaml`` last (its presence marks a finished site)."""
    site_dir = Path(site_dir)
    rows = sorted(rows, key=lambda r: r.key)
    write_manifest(site_dir / "manifest.csv", rows)
    write_dataset_yaml(site_dir / "dataset.yaml", meta)


@dataclass
class SiteData:
    """A validated site: its ``dataset.yaml`` (``meta``) and manifest rows (sorted by key)."""

    root: Path
    meta: dict[str, Any]
    rows: list[FrameRow]
    _video_index: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        keys = sorted({(r.patient_id, r.video_id) for r in self.rows})
        self._video_index = {k: i for i, k in enumerate(keys)}

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.root.name))

    @property
    def role(self) -> str:
        return str(self.meta.get("role", ""))

    def select(self, split: str | None = None, labeled: bool | None = None) -> list[FrameRow]:
        """Rows of ``split`` (None: all), only labeled / unlabeled ones if ``labeled`` is set.

        Raises:
            DataError: ``split`` is not train/val/test.
        """
        if split is not None and split not in SPLITS:
            raise DataError(f"{self.root}: unknown split {split!r} (expected one of {SPLITS})")
        return [
            r
            for r in self.rows
            if (split is None or r.split == split) and (labeled is None or r.labeled == labeled)
        ]

    def video_index(self, patient_id: str, video_id: str) -> int:
        """A stable integer per (patient, video) over the whole site (sorted order)."""
        return self._video_index[(patient_id, video_id)]

    @property
    def n_videos(self) -> int:
        return len(self._video_index)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def card(self) -> dict[str, Any]:
        """Site card: name, role, device and per split {patients, videos, frames, labeled}."""
        counts: dict[str, Any] = {}
        for s in SPLITS:
            rs = [r for r in self.rows if r.split == s]
            counts[s] = {
                "patients": len({r.patient_id for r in rs}),
                "videos": len({(r.patient_id, r.video_id) for r in rs}),
                "frames": len(rs),
                "labeled": sum(r.labeled for r in rs),
            }
        return {
            "name": self.name,
            "role": self.role,
            "device": self.meta.get("device", ""),
            "counts": counts,
            "digest": data_digest(self.root),
        }

    def card_text(self) -> str:
        c = self.card()
        lines = [f"site {c['name']}  role={c['role']}  device={c['device']}  ({self.root})"]
        lines.append(f"  {'split':<6}{'patients':>9}{'videos':>8}{'frames':>8}{'labeled':>9}")
        for s, v in c["counts"].items():
            lines.append(
                f"  {s:<6}{v['patients']:>9}{v['videos']:>8}{v['frames']:>8}{v['labeled']:>9}"
            )
        return "\n".join(lines)


_INT = {"frame_index"}
_OPT_INT = {"source_frame"}
_OPT_FLOAT = {"time_ms", "spacing_x_mm", "spacing_y_mm"}


def _parse_row(raw: dict[str, str], where: str) -> FrameRow:
    vals: dict[str, Any] = {}
    for f in fields(FrameRow):
        v = (raw.get(f.name) or "").strip()
        try:
            if f.name in _INT:
                vals[f.name] = int(v)
            elif f.name in _OPT_INT:
                vals[f.name] = int(v) if v else None
            elif f.name in _OPT_FLOAT:
                vals[f.name] = float(v) if v else None
            elif f.name == "labeled":
                if v not in ("0", "1"):
                    raise ValueError(f"labeled must be 0 or 1 (got {v!r})")
                vals[f.name] = v == "1"
            else:
                vals[f.name] = v
        except ValueError as err:
            raise DataError(f"{where}: bad value in column {f.name!r}: {err}") from None
    return FrameRow(**vals)


def _image_size(path: Path, where: str, check: Check) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: missing file {path}")
    try:
        with Image.open(path) as im:
            if check == "full":
                im.load()
            return im.size
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: refusing {path}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where}: unreadable or corrupt image {path}: {err}") from None


def _check_inside(root: Path, rel: str, column: str, where: str) -> None:
    """A manifest path must stay inside the site folder: a site reads only its own files."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or PureWindowsPath(rel).drive:
        raise DataError(
            f"{where}: {column} {rel!r} leaves the site folder (use a path relative to {root})"
        )


def _check_complete(raw: dict, n_columns: int, where: str) -> None:
    """csv gives missing trailing fields as None and extra ones under the key None."""
    if None in raw or any(v is None for v in raw.values()):
        got = sum(v is not None for k, v in raw.items() if k is not None) + len(raw.get(None) or [])
        raise DataError(
            f"{where}: {got} field(s) where the header has {n_columns}: a cut or misquoted row"
        )


def data_digest(site_dir: Path) -> str:
    """SHA-256 of the site's ``dataset.yaml`` and ``manifest.csv``: what identifies its data (which
    frames, labels and splits) to a run that resumes. Frames replaced in place under the same
    manifest are not detected."""
    h = hashlib.sha256()
    for name in ("dataset.yaml", "manifest.csv"):
        h.update((Path(site_dir) / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _read_meta(ypath: Path) -> dict[str, Any]:
    if not ypath.is_file():
        raise DataError(f"{ypath}: missing (not a canonical site folder?)")
    try:
        meta = yaml.safe_load(ypath.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise DataError(f"{ypath}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise DataError(f"{ypath}: not valid YAML: {err}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{ypath}: must be a mapping")
    return meta


def _check_row(r: FrameRow, root: Path, where: str, check: Check) -> None:
    """One parsed row: known split, ids present, paths inside the site, files readable."""
    if r.split not in SPLITS:
        raise DataError(f"{where}: unknown split {r.split!r} (expected one of {SPLITS})")
    if not r.patient_id or not r.video_id or not r.image_path:
        raise DataError(f"{where}: patient_id, video_id and image_path must not be empty")
    if r.labeled and not r.mask_path:
        raise DataError(f"{where}: labeled row without a mask_path")
    _check_inside(root, r.image_path, "image_path", where)
    if r.mask_path:
        _check_inside(root, r.mask_path, "mask_path", where)
    if check == "none":
        return
    isize = _image_size(root / r.image_path, where, check)
    if r.mask_path:
        msize = _image_size(root / r.mask_path, where, check)
        if msize != isize:
            raise DataError(
                f"{where}: mask size {msize} != image size {isize} ({root / r.mask_path})"
            )


def _read_rows(mpath: Path, root: Path, check: Check) -> list[FrameRow]:
    if not mpath.is_file():
        raise DataError(f"{mpath}: missing")
    try:
        text = mpath.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{mpath}: not UTF-8 text (byte {err.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{mpath}: missing column(s) {missing}")
    rows: list[FrameRow] = []
    seen: dict[tuple[str, str, int], int] = {}
    for i, raw in enumerate(reader):
        line = i + 2  # 1-based, after the header
        where = f"{mpath} row {line}"
        _check_complete(raw, len(header), where)
        r = _parse_row(raw, where)
        if r.key in seen:
            raise DataError(
                f"{where}: duplicate (patient, video, frame) {r.key} (first at row {seen[r.key]})"
            )
        seen[r.key] = line
        _check_row(r, root, where, check)
        rows.append(r)
    if not rows:
        raise DataError(f"{mpath}: no frames (a header without rows)")
    return rows


def load_site(site_dir: str | Path, check: Check = "headers") -> SiteData:
    """Read and validate a canonical site folder.

    Args:
        site_dir: folder with ``dataset.yaml`` and ``manifest.csv``.
        check: "none" checks the manifest only; "headers" also that every image/mask exists, opens
            as an image, and that mask size == image size; "full" decodes every file.

    Raises:
        DataError: missing or non-UTF-8 dataset.yaml/manifest, a missing column, a cut row, an
            empty manifest, a path outside the site folder, a missing, corrupt or oversized
            image, mask size ≠ image size, duplicate (patient, video, frame), unknown split, a
            labeled row without a mask.
    """
    root = Path(site_dir)
    meta = _read_meta(root / "dataset.yaml")
    rows = _read_rows(root / "manifest.csv", root, check)
    rows.sort(key=lambda r: r.key)
    return SiteData(root=root, meta=meta, rows=rows)


def split_patients(
    patients: Sequence[str], seed: int, fractions: tuple[float, float, float] = (0.68, 0.16, 0.16)
) -> dict[str, str]:
    """Assign patients to train/val/test, deterministic from ``seed``.

    Each non-zero fraction gets at least one patient when there are enough patients (train first).
    """
    import numpy as np

    ps = sorted(set(patients))
    n = len(ps)
    order = [ps[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if fractions[1] > 0 and n_val == 0 and n >= 3:
        n_val = 1
    if fractions[2] > 0 and n_test == 0 and n >= 2:
        n_test = 1
    while n_val + n_test >= n and (n_val + n_test) > 0 and fractions[0] > 0:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    out = {}
    for i, p in enumerate(order):
        out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out
