"""Specs for the canonical layout: manifest schema, validation errors, site card."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.manifest import (
    COLUMNS,
    DataError,
    FrameRow,
    load_site,
    split_patients,
    write_site_files,
)


def make_site(
    root: Path, videos=(("p1", "v1", "train"), ("p2", "v1", "test")), n=3, hw=(20, 30), labeled=True
) -> Path:
    """A small hand-made site: n frames per video, masks on every frame when ``labeled``."""
    rows = []
    rng = np.random.default_rng(0)
    for pid, vid, split in videos:
        for t in range(n):
            img = f"frames/{pid}/{vid}/{t:05d}.png"
            (root / img).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, hw, dtype=np.uint8)).save(root / img)
            msk = ""
            if labeled:
                msk = f"masks/{pid}/{vid}/{t:05d}.png"
                (root / msk).parent.mkdir(parents=True, exist_ok=True)
                lab = np.zeros(hw, np.uint8)
                lab[hw[0] // 2 :, :] = 1
                Image.fromarray(lab).save(root / msk)
            rows.append(
                FrameRow(
                    pid,
                    vid,
                    t,
                    img,
                    msk,
                    labeled,
                    split,
                    "dorsal",
                    "dev",
                    50.0 * t,
                    0.1,
                    0.1,
                    "",
                    t,
                )
            )
    write_site_files(root, {"name": "hand", "role": "source", "device": "dev"}, rows)
    return root


def _edit_manifest(root: Path, fn) -> None:
    p = root / "manifest.csv"
    rows = list(csv.DictReader(p.open()))
    header = list(rows[0].keys())
    rows, header = fn(rows, header)
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def test_manifest_columns_are_exactly_the_documented_ones(tmp_path: Path):
    root = make_site(tmp_path)
    header = (root / "manifest.csv").read_text().splitlines()[0].split(",")
    assert (
        tuple(header)
        == COLUMNS
        == (
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
    )


def test_site_card_counts_and_video_index(tmp_path: Path):
    root = make_site(
        tmp_path, videos=(("p1", "v1", "train"), ("p1", "v2", "train"), ("p2", "v1", "test"))
    )
    s = load_site(root, check="full")
    card = s.card()
    assert card["counts"]["train"] == {"patients": 1, "videos": 2, "frames": 6, "labeled": 6}
    assert card["counts"]["test"] == {"patients": 1, "videos": 1, "frames": 3, "labeled": 3}
    assert card["counts"]["val"]["frames"] == 0
    assert [s.video_index(*k) for k in (("p1", "v1"), ("p1", "v2"), ("p2", "v1"))] == [0, 1, 2]
    assert len(s.select("train", labeled=True)) == 6 and len(s.select("test", labeled=False)) == 0
    assert "train" in s.card_text()


def test_missing_dataset_yaml(tmp_path: Path):
    root = make_site(tmp_path)
    (root / "dataset.yaml").unlink()
    with pytest.raises(DataError, match="dataset.yaml: missing"):
        load_site(root)


def test_missing_column_is_named(tmp_path: Path):
    root = make_site(tmp_path)
    _edit_manifest(
        root,
        lambda rows, h: (
            [{k: v for k, v in r.items() if k != "split"} for r in rows],
            [c for c in h if c != "split"],
        ),
    )
    with pytest.raises(DataError, match=r"manifest.csv: missing column\(s\) \['split'\]"):
        load_site(root)


def test_missing_image_file_names_file_and_row(tmp_path: Path):
    root = make_site(tmp_path)
    (root / "frames/p1/v1/00001.png").unlink()
    with pytest.raises(
        DataError, match=r"manifest.csv row 3: missing file .*frames/p1/v1/00001.png"
    ):
        load_site(root)


def test_corrupt_png_names_file_and_row(tmp_path: Path):
    root = make_site(tmp_path)
    (root / "masks/p2/v1/00002.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(
        DataError, match=r"row 7: unreadable or corrupt image .*masks/p2/v1/00002.png"
    ):
        load_site(root)


def test_truncated_png_is_caught_by_full_check(tmp_path: Path):
    root = make_site(tmp_path)
    p = root / "frames/p1/v1/00000.png"
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"row 2: unreadable or corrupt image .*00000.png"):
        load_site(root, check="full")


def test_mask_size_mismatch(tmp_path: Path):
    root = make_site(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks/p1/v1/00002.png")
    with pytest.raises(DataError, match=r"row 4: mask size \(10, 10\) != image size \(30, 20\)"):
        load_site(root)


def test_duplicate_frame_key(tmp_path: Path):
    root = make_site(tmp_path)
    _edit_manifest(root, lambda rows, h: (rows + [rows[0]], h))
    with pytest.raises(
        DataError,
        match=r"row 8: duplicate \(patient, video, frame\) \('p1', 'v1', 0\) \(first at row 2\)",
    ):
        load_site(root)


def test_unknown_split(tmp_path: Path):
    root = make_site(tmp_path)
    _edit_manifest(
        root,
        lambda rows, h: (
            [{**r, "split": "holdout"} if i == 2 else r for i, r in enumerate(rows)],
            h,
        ),
    )
    with pytest.raises(DataError, match=r"row 4: unknown split 'holdout'"):
        load_site(root)


def test_labeled_row_without_mask(tmp_path: Path):
    root = make_site(tmp_path)
    _edit_manifest(
        root,
        lambda rows, h: ([{**r, "mask_path": ""} if i == 1 else r for i, r in enumerate(rows)], h),
    )
    with pytest.raises(DataError, match=r"row 3: labeled row without a mask_path"):
        load_site(root)


def test_manifest_cut_mid_row_names_the_row(tmp_path: Path):
    root = make_site(tmp_path)
    p = root / "manifest.csv"
    text = p.read_text()
    p.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])  # the last row, cut
    with pytest.raises(DataError, match=r"row 7: \d+ field\(s\) where the header has 14"):
        load_site(root, check="none")


@pytest.mark.parametrize(
    "column, path",
    [
        ("image_path", "/etc/hostname"),
        ("image_path", "../../outside.png"),
        ("mask_path", "masks/../../../outside.png"),
        ("image_path", "C:/frames/a.png"),
    ],
)
def test_paths_outside_the_site_folder_are_refused(tmp_path: Path, column, path):
    root = make_site(tmp_path / "site")
    _edit_manifest(
        root,
        lambda rows, h: ([{**r, column: path} if i == 0 else r for i, r in enumerate(rows)], h),
    )
    with pytest.raises(DataError, match=rf"row 2: {column} .* leaves the site folder"):
        load_site(root, check="none")


def test_header_only_manifest_is_not_a_site(tmp_path: Path):
    root = make_site(tmp_path)
    p = root / "manifest.csv"
    p.write_text(p.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no frames"):
        load_site(root)


@pytest.mark.parametrize("name", ["manifest.csv", "dataset.yaml"])
def test_non_utf8_site_files_are_named(tmp_path: Path, name):
    root = make_site(tmp_path)
    (root / name).write_bytes((root / name).read_bytes() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{name}: not UTF-8"):
        load_site(root, check="none")


def bomb_png(path: Path, width: int = 60000, height: int = 60000) -> None:
    """A valid small PNG whose header claims ``width`` × ``height`` pixels."""
    import struct
    import zlib

    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_refused_naming_the_file(tmp_path: Path):
    root = make_site(tmp_path)
    frame = root / "frames/p1/v1/00001.png"
    bomb_png(frame)
    with pytest.raises(DataError, match=rf"row 3: refusing {frame}"):
        load_site(root)


def test_patient_split_is_deterministic_and_complete():
    pats = [f"p{i:03d}" for i in range(50)]
    a, b, c = split_patients(pats, 7), split_patients(pats, 7), split_patients(pats, 8)
    assert a == b and a != c
    n = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert n == {"train": 34, "val": 8, "test": 8}
    assert set(split_patients(["a", "b", "c"], 0).values()) == {"train", "val", "test"}
