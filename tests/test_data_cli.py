"""Specs for `crossprobe data`: synth → validate → export, and validate failing on bad data."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from crossprobe.data import data_app


def test_synth_validate_export(tmp_path: Path):
    r = CliRunner()
    out = tmp_path / "site"
    a = r.invoke(
        data_app,
        [
            "synth",
            "--preset",
            "target",
            "--patients",
            "3",
            "--videos-per-patient",
            "1",
            "--frames-per-video",
            "8",
            "--size",
            "48",
            "--out",
            str(out),
            "--seed",
            "4",
        ],
    )
    b = r.invoke(data_app, ["validate", str(out)])
    c = r.invoke(data_app, ["export", str(out), "--out", str(tmp_path / "authors")])
    assert a.exit_code == 0, a.output
    assert b.exit_code == 0 and "role=target" in b.output
    assert c.exit_code == 0 and (tmp_path / "authors" / "Images").is_dir()


def test_validate_fails_with_the_data_error(tmp_path: Path):
    from tests.test_data_manifest import make_site

    root = make_site(tmp_path)
    (root / "frames/p2/v1/00000.png").unlink()
    res = CliRunner().invoke(data_app, ["validate", str(root)])
    assert res.exit_code == 1
    assert "missing file" in res.output and "00000.png" in res.output
