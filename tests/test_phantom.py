"""Specs for the phantom: geometry, device presets, renderer, site generation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import SiteConfig, SynthConfig
from common.data.manifest import load_site
from simulations.phantom.device import (
    LUMIFY,
    TELEMED,
    DevicePreset,
    get_device,
    get_operator,
    get_site_preset,
    register_device,
)
from simulations.phantom.geometry import physis_gap_mm, sample_anatomy, surface
from simulations.phantom.render import VideoSpec, frame_shape, render_video
from simulations.sites import ensure_site, plan_site, synth_site


def _anat(view="dorsal", seed=0, **kw):
    return sample_anatomy(np.random.default_rng(seed), view, LUMIFY.fov_w_mm, **kw)


def _video(device="lumify", operator="expert", n=6, size=64, seed=0, view="dorsal", **kw):
    dev = get_device(device)
    a = sample_anatomy(np.random.default_rng(seed), view, dev.fov_w_mm, fracture_p=0.0)
    return render_video(VideoSpec(a, dev, get_operator(operator), n, size, (seed,), **kw))


def test_physis_gap_shrinks_with_age_and_is_clipped():
    ages = [0.0, 8.0, 18.0]
    gaps = [physis_gap_mm(a) for a in ages]
    assert gaps[0] == 2.5 and gaps[2] == 0.35
    assert gaps[1] == pytest.approx(2.6 - 0.14 * 8)


def test_surface_has_metaphysis_gap_epiphysis_and_carpals_in_order():
    a = _anat(fracture_p=0.0)
    x = np.linspace(0, LUMIFY.fov_w_mm, 2000)
    z, lab = surface(a, x, a.y_c)
    # labels appear left to right 1, (gap), 2, (gap), 3 and NaN exactly where label is 0
    runs = [int(v) for i, v in enumerate(lab) if i == 0 or v != lab[i - 1]]
    assert runs[:5] == [1, 0, 2, 0, 3]
    assert np.array_equal(np.isnan(z), lab == 0)
    gap = x[(lab == 0) & (x > a.x_phys - 0.01) & (x < a.x_phys + a.phys_gap + 0.5)]
    assert gap.max() - gap.min() == pytest.approx(a.phys_gap, abs=0.05)


def test_transverse_curvature_deepens_bone_away_from_crest():
    a = _anat(fracture_p=0.0)
    x = np.array([a.x_phys - 5.0])
    z0, _ = surface(a, x, a.y_c)
    z4, _ = surface(a, x, a.y_c + 4.0)
    assert z4[0] - z0[0] == pytest.approx(16.0 / (2 * a.r_y))


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="unknown view"):
        _anat(view="lateral")


def test_device_presets_differ_as_in_the_table_and_more_can_be_registered():
    extra = DevicePreset(**{**LUMIFY.__dict__, "name": "butterfly", "gamma": 1.1})
    register_device(extra)
    assert get_device("butterfly").gamma == 1.1
    assert (
        LUMIFY.psf_axial_mm < TELEMED.psf_axial_mm
        and LUMIFY.dynamic_range_db > TELEMED.dynamic_range_db
    )
    assert TELEMED.jpeg_quality == 55 and LUMIFY.jpeg_quality is None
    assert "radial" in get_site_preset("source").views
    assert "radial" not in get_site_preset("target").views
    with pytest.raises(KeyError, match="unknown device preset"):
        get_device("nope")


def test_render_shapes_dtype_and_labels():
    v = _video(n=4, size=64)
    h, w = frame_shape(LUMIFY, 64)
    assert v.frames.shape == (4, h, w) and v.frames.dtype == np.uint8
    assert v.labels.shape == v.frames.shape and set(np.unique(v.labels)) <= {0, 1, 2, 3}
    assert (v.labels > 0).any()
    assert v.spacing_mm[0] == pytest.approx(LUMIFY.fov_w_mm / 64)


def test_bone_is_bright_and_shadow_below_is_dark():
    v = _video(n=3, size=128, difficulty=0.0)
    img, lab = v.frames[1].astype(float), v.labels[1]
    # the top rows of the mask band (the bone echo) are brighter than the deep shadow
    cols = np.where(lab.any(0))[0]
    top = lab.argmax(0)
    echo = np.mean([img[top[c] : top[c] + 2, c].max() for c in cols])
    shadow = np.mean([img[top[c] + 25 :, c].mean() for c in cols])
    assert echo > 150 and shadow < 40 and echo > 4 * shadow


def test_same_seed_same_video_other_seed_differs():
    a, b, c = _video(seed=3), _video(seed=3), _video(seed=4)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.frames, c.frames)


def _corr(x, y):
    x, y = x.astype(float).ravel(), y.astype(float).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def test_neighbouring_frames_correlate_more_than_distant_ones():
    v = _video(n=40, size=64, seed=1)
    f = v.frames
    c1 = np.mean([_corr(f[i], f[i + 1]) for i in range(0, 8)])
    c30 = np.mean([_corr(f[i], f[i + 30]) for i in range(0, 8)])
    assert c1 > 0.9 and c1 > c30 + 0.05


def test_target_operator_effects_appear_at_high_difficulty():
    v = _video("telemed", "novice", n=30, size=48, seed=5, difficulty=3.0)
    # off-plane frames exist (novice operator), and labels stay within the frame
    assert any(v.info["offplane"])
    assert v.labels.max() <= 3


def _site(role="source", preset="source", seed=1, **kw):
    syn = dict(preset=preset, patients=6, videos_per_patient=1, frames_per_video=8, seed=seed)
    syn.update(kw)
    return SiteConfig(name=f"s_{role}", role=role, synth=SynthConfig(**syn))


def test_tiny_site_is_fast_and_byte_identical(tmp_path: Path):
    site = _site()
    t0 = time.perf_counter()
    a = synth_site(site, 64, tmp_path / "a", progress=False)
    dt = time.perf_counter() - t0
    b = synth_site(site, 64, tmp_path / "b", workers=1, progress=False)
    assert dt < 5.0
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa and fa == fb
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)


def test_source_site_is_fully_labeled_with_patient_splits(tmp_path: Path):
    s = load_site(synth_site(_site(), 64, tmp_path / "s", progress=False), check="full")
    c = s.card()["counts"]
    assert all(r.labeled for r in s.rows)
    assert (c["train"]["patients"], c["val"]["patients"], c["test"]["patients"]) == (4, 1, 1)
    for p in {r.patient_id for r in s.rows}:
        assert len({r.split for r in s.rows if r.patient_id == p}) == 1
    assert s.meta["provenance"]["seed"] == 1 and s.meta["device"] == "lumify"


def test_target_site_has_sparse_labels_every_eighth_frame(tmp_path: Path):
    s = load_site(
        synth_site(
            _site("target", "target", frames_per_video=16), 64, tmp_path / "t", progress=False
        )
    )
    off = load_site(
        synth_site(
            _site("target", "target", frames_per_video=16, target_train_labels=False),
            64,
            tmp_path / "t2",
            progress=False,
        )
    )
    assert s.rows and all(r.labeled == (r.frame_index % 8 == 0) for r in s.rows)
    assert {r.view for r in s.rows} <= {"dorsal", "proximal_dorsal", "volar", "proximal_volar"}
    assert not off.select("train", labeled=True) and off.select("test", labeled=True)


def test_ensure_site_generates_once_and_refuses_foreign_folders(tmp_path: Path):
    site = _site()
    p1 = ensure_site(site, 64, tmp_path, progress=False)
    mtime = (p1 / "dataset.yaml").stat().st_mtime_ns
    p2 = ensure_site(site, 64, tmp_path, progress=False)
    (tmp_path / "s_target").mkdir()
    assert p1 == p2 == tmp_path / "s_source"
    assert (p2 / "dataset.yaml").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    from common.data.manifest import DataError

    with pytest.raises(DataError, match="not a site made by"):
        ensure_site(_site("target", "target"), 64, tmp_path, progress=False)


def test_ensure_site_regenerates_when_the_config_changes(tmp_path: Path):
    ensure_site(_site(), 64, tmp_path, progress=False)
    p = ensure_site(_site(frames_per_video=4), 64, tmp_path, progress=False)
    assert len(load_site(p).rows) == 24


def test_calibration_probe_measures_the_lower_upper_gap(tmp_path):
    # the probe that set the default difficulty runs the real stages on freshly rendered sites
    from simulations.phantom.calibrate import probe

    res = probe(Path("configs/tiny.yaml"), 0.5, [0], tmp_path, repeats=2)
    (row,) = res["rows"]
    assert 0.0 <= row["lower"] <= 1.0 and 0.0 <= row["upper"] <= 1.0
    # the lower bound is the mean of two fine-tuning runs, which differ
    assert len(row["lower_runs"]) == 2 and row["lower_runs"][0] != row["lower_runs"][1]
    assert row["lower"] == pytest.approx(np.mean(row["lower_runs"]))
    assert res["noise_floor_single_run"] == pytest.approx(np.std(row["lower_runs"], ddof=1))
    assert row["gap"] == pytest.approx(row["upper"] - row["lower"])
    assert res["difficulty"] == 0.5 and res["gap_sd"] is None
    assert 0.0 <= row["lower_in_domain"] <= 1.0 and res["noise_floor"] is None
    assert 0.0 <= row["lower_edge"] <= 1.0 and 0.0 <= row["upper_edge"] <= 1.0
    assert res["noise_floor_from_videos"] is None  # one seed: no spread to split
    # the target was rendered at the probed difficulty; the source keeps its preset's
    data = tmp_path / "d0.5" / "data"
    target = load_site(data / "telemed").meta["provenance"]
    source = load_site(data / "lumify").meta["provenance"]
    assert target["difficulty"] == 0.5 and source["difficulty"] == 1.0


@pytest.mark.parametrize("device, operator", [("lumify", "expert"), ("telemed", "novice")])
def test_frames_end_without_a_bright_line_at_the_bottom(device, operator):
    # The PSF convolution is an FFT: without a zero margin it wrapped the bright near field into
    # the last rows, a bright line over the zero padding below the frame, which is what a bone
    # surface over its shadow looks like (lumify: last rows 58 against 30 just above them)
    last, above = [], []
    for seed in range(3):
        f = _video(device, operator, n=2, size=96, seed=seed, difficulty=2.0).frames.astype(float)
        last.append(f[:, -2:].mean())
        above.append(f[:, -12:-4].mean())
    assert np.mean(last) < np.mean(above) + 3.0, (last, above)


def test_annotation_noise_moves_the_labels_and_never_the_image():
    clean = _video("telemed", "novice", n=4, size=64, seed=3, difficulty=2.0, annotation_noise=0.0)
    noisy = _video("telemed", "novice", n=4, size=64, seed=3, difficulty=2.0, annotation_noise=2.0)
    assert np.array_equal(clean.frames, noisy.frames)
    assert not np.array_equal(clean.labels, noisy.labels)
    # how hard the frames are to read is the image's business
    easy = _video("telemed", "novice", n=4, size=64, seed=3, difficulty=0.0, annotation_noise=0.0)
    assert not np.array_equal(easy.frames, clean.frames)


def test_the_source_is_scanned_by_an_expert_and_the_target_by_novices():
    def difficulties(preset: str, **kw) -> set[float]:
        return {j.spec.difficulty for j in plan_site(_site("target", preset, **kw), 64)}

    assert get_site_preset("source").difficulty == 1.0
    assert difficulties("source") == {1.0} and difficulties("target") == {2.0}
    assert difficulties("target", difficulty=0.5) == {0.5}  # a site's own setting wins
    ann = {j.spec.annotation_noise for j in plan_site(_site("target", "target"), 64)}
    assert ann == {SynthConfig(preset="target").annotation_noise}


def test_interaction_floor_separates_a_whole_model_shift_from_per_video_luck():
    from simulations.phantom.calibrate import interaction_floor

    rng = np.random.default_rng(0)
    seed_shift, video_level = rng.normal(0, 0.05, (3, 1)), rng.uniform(0.3, 0.9, (1, 40))
    assert interaction_floor(seed_shift + video_level) == pytest.approx(0.0, abs=1e-12)
    luck = rng.normal(0, 0.1, (3, 40))
    v = seed_shift + video_level + luck
    # the slow reference: per video, the seeds' spread around the seed and video means
    m = v.mean()
    resid = [[v[s, j] - v[s].mean() - v[:, j].mean() + m for j in range(40)] for s in range(3)]
    per_video_var = [sum(resid[s][j] ** 2 for s in range(3)) / 2 for j in range(40)]
    assert interaction_floor(v) == pytest.approx(np.sqrt(np.mean(per_video_var) / 40))
    assert interaction_floor(v[:1]) is None


def test_padding_edge_share_counts_frames_with_bone_along_the_padding(tmp_path: Path):
    from common.data.datasets import SegDataset
    from simulations.phantom.edge import edge_band, padding_edge_share

    band = edge_band(48, 64, 64, 3)  # a wide frame: padding below it only
    assert band.sum() == 3 * 64 and band[45:48].all() and not band[:45].any()
    assert not band[48:].any()  # the padding itself is not the band
    site = synth_site(_site("target", "target"), 64, tmp_path / "t", progress=False)
    ds = SegDataset(site, "test", 64)

    def const(logit: float):
        return lambda x: torch.full((len(x), 1, 64, 64), logit)

    def bone_at(rows: slice):
        def net(x):
            out = torch.full((len(x), 1, 64, 64), -10.0)
            out[:, :, rows] = 10.0
            return out

        return net

    assert padding_edge_share(const(10.0), ds) == 1.0
    assert padding_edge_share(const(-10.0), ds) == 0.0
    assert padding_edge_share(bone_at(slice(0, 10)), ds) == 0.0  # bone near the skin line
    h = frame_shape(TELEMED, 64)[0]  # frames are 64 px wide: the model input is the frame + padding
    assert padding_edge_share(bone_at(slice(h - 3, h)), ds) == 1.0  # the last rows of the frame
    assert padding_edge_share(bone_at(slice(h, 64)), ds) == 0.0  # the padding itself
