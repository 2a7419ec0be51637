"""The target hospital uses what it learned: a tiny federated study (in process, the real ServerApp
and ClientApp), the fused model the target keeps as a bundle, and `crossprobe segment` on a DICOM
cine and an MP4 the test makes: masks at each frame's own size, the CSV, the overlay video."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clients.app import app as client_app
from common.config import dump_experiment, load_experiment
from common.segment import CSV_COLUMNS
from crossprobe.cli import app as crossprobe_cli
from server.app import app as server_app
from tests.fl_harness import run_server, site_grid
from tests.test_data_ingest import _dicom_fixture, _write_video

STEPS = {f"{s}.optim.max_steps": 2 for s in ("simmim", "contrastive", "finetune")}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A tiny study run to its report; the run folder (sites under ``sites/<name>``)."""
    from simulations.sites import ensure_site
    from tests.fl_harness import task_identity

    tmp = tmp_path_factory.mktemp("study")
    cfg = load_experiment("configs/tiny.yaml", overrides=STEPS)
    exp = tmp / "tiny.yaml"
    exp.write_text(dump_experiment(cfg.model_copy(update={"name": "segment"})))
    root = tmp / "data"
    for site in cfg.sites:
        ensure_site(site, cfg.model.img_size, root, progress=False)
    with task_identity():
        run_server(server_app, site_grid(client_app, exp, tmp / "run", root, 2))
    return tmp / "run"


def test_the_target_keeps_the_fused_model_it_evaluated(study):
    from common import stages
    from common.bundle import load_bundle
    from common.data.manifest import load_site

    bundle = load_bundle(study / "sites" / "telemed" / "bundle")
    card = bundle.card
    assert bundle.pair == ("simmim", "mtnxent") and bundle.mode == "entropy"
    assert card["img_size"] == bundle.cfg.model.img_size and card["config_hash"]
    # the card's scores are the ones the site reported, and the weights reproduce them
    results = json.loads((study / "results.json").read_text())
    reported = results["evaluation"]["telemed"]["metrics"]["fusion-entropy/dice"]
    assert card["metrics"]["fusion-entropy/dice"] == pytest.approx(reported, abs=1e-12)
    site = load_site(study.parent / "data" / "telemed")
    again = stages.evaluate(bundle.cfg, site, study / "re-eval", bundle.states, [bundle.pair],
                            progress=False)  # fmt: skip
    assert again.metrics["fusion-entropy/dice"] == pytest.approx(reported, abs=1e-9)


def _sweep_mp4(path: Path, site_dir: Path, h: int = 40, w: int = 56) -> np.ndarray:
    """An MP4 of the target's own frames, cut to a non-square (h, w) (padding to undo)."""
    frames = sorted((site_dir / "frames").rglob("*.png"))[:7]
    arr = np.stack([np.asarray(Image.open(f).convert("L"))[:h, :w] for f in frames])
    _write_video(path, arr)
    return arr


def test_segment_a_dicom_cine_and_an_mp4_with_the_kept_bundle(study, tmp_path):
    import av

    dcm = _dicom_fixture()
    mp4 = tmp_path / "sweep.mp4"
    frames = _sweep_mp4(mp4, study.parent / "data" / "telemed")
    out = tmp_path / "seg"
    res = CliRunner().invoke(crossprobe_cli, [
        "segment", str(study / "sites" / "telemed" / "bundle"), str(dcm), str(mp4),
        "--out", str(out), "--batch-size", "4",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "frames/s" in res.output and "flagged" in res.output
    for name, shape, n in [(dcm.stem, (209, 236), 30), ("sweep", frames.shape[1:], len(frames))]:
        folder = out / name
        masks = sorted((folder / "masks").glob("*.png"))
        assert len(masks) == n
        assert all(np.asarray(Image.open(m)).shape == shape for m in masks)
        with (folder / "frames.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == n
        assert all(0 <= float(r["branch_agreement"]) <= 1 and r["flag"] in "01" for r in rows)
        with av.open(str(folder / "overlay.mp4")) as video:
            decoded = [f.to_ndarray(format="gray") for f in video.decode(video=0)]
        assert len(decoded) == n and decoded[0].shape[0] >= shape[0]
    nib = pytest.importorskip("nibabel")
    vol = np.asarray(nib.load(str(out / dcm.stem / "mask.nii.gz")).dataobj)
    assert vol.shape == (236, 209, 30)  # (W, H, T): how ITK-SNAP and the ingest reader read it
    assert not (out / "sweep" / "mask.nii.gz").exists()  # an MP4 gets no NIfTI


def test_segment_names_what_it_cannot_read(study, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom")
    runner = CliRunner()
    res = runner.invoke(crossprobe_cli, ["segment", str(study / "sites" / "telemed" / "bundle"),
                                         str(bad), "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code != 0 and "broken.dcm" in str(res.exception or res.output)
    res = runner.invoke(crossprobe_cli, ["segment", str(tmp_path), str(bad), "--out", "o"])
    assert res.exit_code != 0 and "not a crossprobe bundle" in str(res.exception or res.output)


def test_export_onnx_holds_both_branches_and_the_fusion_and_reproduces_torch(study, tmp_path):
    pytest.importorskip("onnxruntime")
    import hashlib

    import onnxruntime as ort
    import torch

    from common.bundle import load_bundle
    from common.onnx_export import fused_pair

    bundle_dir = study / "sites" / "telemed" / "bundle"
    out = tmp_path / "fused.onnx"
    res = CliRunner().invoke(
        crossprobe_cli,
        [
            "export",
            "onnx",
            str(bundle_dir),
            "--out",
            str(out),
            "--site",
            str(study.parent / "data" / "telemed"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "test frames of telemed" in res.output
    equal = re.search(r"masks ([0-9.]+)% equal", res.output)
    assert equal and float(equal.group(1)) >= 99.9, res.output  # the documented bound
    record = json.loads((tmp_path / "fused.onnx.json").read_text())
    assert set(record["files"]) == {"fused.onnx", "fused.onnx.data"}  # ship and hash both
    for name, digest in record["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    # a dynamic batch: 3 frames through a graph exported with 2, the same as torch
    bundle = load_bundle(bundle_dir)
    s = bundle.cfg.model.img_size
    x = torch.rand(3, 3, s, s, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(out)).run(None, {"images": x.numpy()})
    with torch.inference_mode():
        want = fused_pair(bundle)(x)
    assert [g.shape for g in got] == [(3, 1, s, s)] * 3
    assert np.abs(got[1] - want[1].numpy()).max() < 1e-4  # a branch, everywhere
    assert ((got[0] >= 0.5) == (want[0].numpy() >= 0.5)).mean() >= 0.999


def test_segment_on_onnxruntime_gives_the_masks_torch_gives(study, tmp_path):
    pytest.importorskip("onnxruntime")
    bundle = str(study / "sites" / "telemed" / "bundle")
    mp4 = tmp_path / "sweep.mp4"
    _sweep_mp4(mp4, study.parent / "data" / "telemed")
    runner = CliRunner()
    graph = tmp_path / "fused.onnx"
    assert (
        runner.invoke(crossprobe_cli, ["export", "onnx", bundle, "--out", str(graph)]).exit_code
        == 0
    )
    for backend, extra in (("torch", []), ("onnx", ["--onnx", str(graph)])):
        res = runner.invoke(crossprobe_cli, ["segment", bundle, str(mp4), "--out",
                                             str(tmp_path / backend), *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
    assert "on onnxruntime" in res.output
    masks = {
        b: np.stack(
            [
                np.asarray(Image.open(m))
                for m in sorted((tmp_path / b / "sweep" / "masks").glob("*.png"))
            ]
        )
        for b in ("torch", "onnx")
    }
    assert masks["torch"].shape == masks["onnx"].shape
    assert (masks["torch"] == masks["onnx"]).mean() >= 0.999
    # a graph of another mode is refused, naming the file
    res = runner.invoke(crossprobe_cli, ["segment", bundle, str(mp4), "--out", str(tmp_path / "x"),
                                         "--onnx", str(graph), "--mode", "mean"])  # fmt: skip
    assert res.exit_code != 0 and "fused.onnx" in str(res.exception)


def test_segment_a_png_folder_and_a_site_folder_one_output_per_video(study, tmp_path):
    from common.data.manifest import load_site

    site_dir = study.parent / "data" / "telemed"
    site = load_site(site_dir)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    frames = _sweep_mp4(tmp_path / "unused.mp4", site_dir)  # the same non-square cut-outs
    for i, f in enumerate(frames):
        Image.fromarray(f).save(pngs / f"f{i}.png")
    out = tmp_path / "seg"
    bundle = str(study / "sites" / "telemed" / "bundle")
    args = ["segment", bundle, str(pngs), str(site_dir), "--out", str(out)]
    res = CliRunner().invoke(crossprobe_cli, args)
    assert res.exit_code == 0, res.output
    masks = sorted((out / "pngs" / "masks").glob("*.png"))
    assert len(masks) == len(frames) and np.asarray(Image.open(masks[0])).shape == frames.shape[1:]
    videos = {(r.patient_id, r.video_id) for r in site.rows}
    assert {p.name for p in out.iterdir()} == {"pngs"} | {f"{p}-{v}" for p, v in videos}
