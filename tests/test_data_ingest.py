"""Specs for the real-format readers and the canonical/authors' layout conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.ingest import (
    export_authors,
    import_authors,
    ingest,
    read_dicom_cine,
    read_nifti_labels,
    read_video,
)
from common.data.manifest import DataError, load_site
from tests.test_data_manifest import make_site


def _dicom_fixture() -> Path:
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    try:
        p = get_testdata_file("examples_ybr_color.dcm")
    except Exception as err:  # pragma: no cover - only without the bundled test files
        pytest.skip(f"pydicom's examples_ybr_color.dcm is not available offline: {err}")
    if p is None:  # pragma: no cover
        pytest.skip("pydicom's examples_ybr_color.dcm is not bundled in this install")
    return Path(p)


def _write_video(path: Path, frames: np.ndarray) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.stack([f] * 3, -1), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _write_nifti(path: Path, vol_thw: np.ndarray) -> None:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(vol_thw.transpose(2, 1, 0).copy(), np.eye(4)), str(path))


def test_dicom_cine_is_cropped_to_the_clipped_region():
    path = _dicom_fixture()
    cine = read_dicom_cine(path)
    # region (84, 31)–(595, 414) exceeds the 320×240 image and is clipped to it
    assert cine.frames.shape == (30, 240 - 31, 320 - 84) and cine.frames.dtype == np.uint8
    assert cine.crop == (31, 240, 84, 320)
    assert cine.spacing_mm[0] == pytest.approx(0.5105, abs=1e-3)
    assert cine.time_ms[1] == pytest.approx(33.333)


def test_ingest_dicom_gives_a_valid_site(tmp_path: Path):
    path = _dicom_fixture()
    out = ingest([path], tmp_path / "site", "dcm", "target", device="unknown", split="test")
    s = load_site(out, check="full")
    assert len(s.rows) == 30 and not s.select(labeled=True)
    assert s.rows[0].patient_id and s.rows[0].split == "test" and s.rows[0].spacing_x_mm > 0


def test_mp4_with_nifti_labels(tmp_path: Path):
    rng = np.random.default_rng(0)
    frames = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :], 48, 1)
    frames = np.repeat(frames, 6, 0) + rng.integers(0, 3, (6, 48, 64), dtype=np.uint8)
    (tmp_path / "in" / "pat7").mkdir(parents=True)
    video = tmp_path / "in" / "pat7" / "sweep1.mp4"
    _write_video(video, frames)
    labels = np.zeros((6, 48, 64), np.uint8)
    labels[2, 30:, 10:50] = 1
    labels[4, 25:, :] = 2
    _write_nifti(tmp_path / "in" / "pat7" / "sweep1.nii.gz", labels)
    cine = read_video(video)
    out = ingest([video], tmp_path / "site", "mp4", "source", split="train")
    s = load_site(out, check="full")
    assert cine.frames.shape == (6, 48, 64)
    assert np.abs(cine.frames.astype(int) - frames.astype(int)).mean() < 8  # lossy codec
    assert [r.frame_index for r in s.select(labeled=True)] == [2, 4]
    assert s.rows[0].patient_id == "pat7" and s.rows[0].video_id == "sweep1"
    m = np.asarray(Image.open(out / s.select(labeled=True)[0].mask_path))
    assert np.array_equal(m, labels[2])  # (W, H, T) → (T, H, W), not flipped


def test_nifti_shape_mismatch_is_refused(tmp_path: Path):
    _write_nifti(tmp_path / "l.nii.gz", np.zeros((5, 48, 64), np.uint8))
    with pytest.raises(
        DataError,
        match=r"l.nii.gz: label volume shape .* \(5, 48, 64\) "
        r"does not match the video \(6, 48, 64\)",
    ):
        read_nifti_labels(tmp_path / "l.nii.gz", (6, 48, 64))


def test_png_folder_with_masks(tmp_path: Path):
    d = tmp_path / "p3" / "clip"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for t in (1, 2, 10):  # natural order: 1, 2, 10
        Image.fromarray(np.full((20, 24), t, np.uint8)).save(d / "images" / f"f{t}.png")
    Image.fromarray(np.ones((20, 24), np.uint8)).save(d / "masks" / "f10.png")
    s = load_site(ingest([d], tmp_path / "site", "png", "source", split="val"), check="full")
    assert [r.frame_index for r in s.rows] == [0, 1, 2]
    assert np.asarray(Image.open(s.path(s.rows[2].image_path)))[0, 0] == 10
    assert [r.labeled for r in s.rows] == [False, False, True]


def test_authors_layout_round_trip(tmp_path: Path):
    site = load_site(
        make_site(tmp_path / "orig", videos=(("p1", "v1", "train"), ("p2", "v3", "val")))
    )
    exp = export_authors(site, tmp_path / "authors")
    back = load_site(import_authors(exp, tmp_path / "back", "hand", "source"), check="full")
    assert sorted(p.name for p in exp.glob("*.csv")) == [
        "train.csv",
        "train_labeled.csv",
        "val.csv",
        "val_labeled.csv",
    ]
    assert (exp / "train.csv").read_text().splitlines()[0] == "filename,videoname,framenum"
    key = lambda r: (r.patient_id, r.video_id, r.frame_index, r.labeled, r.split)  # noqa: E731
    assert [key(r) for r in back.rows] == [key(r) for r in site.rows]
    for a, b in zip(site.rows, back.rows, strict=True):
        assert site.path(a.image_path).read_bytes() == back.path(b.image_path).read_bytes()
