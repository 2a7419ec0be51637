"""Measure the phantom: speed, domain shift, temporal coherence; save a montage.

    python -m simulations.phantom.measure [--size 224] [--montage /tmp/phantom_montage.png]

Prints: generation frames/s on ``--workers`` cores (writing PNGs, as ``synth_site`` does); speckle
autocorrelation FWHM (axial × lateral, mm) per device; grey-histogram Jensen–Shannon divergence
(bits) within and across domains; mean frame-to-frame correlation at gaps 1, 5, 15, 30.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common.config import SiteConfig, SynthConfig
from simulations.phantom.render import RenderedVideo, render_video
from simulations.sites import plan_site, synth_site


def _site(
    role: str, seed: int, patients: int, vpp: int, frames: int, difficulty: float | None
) -> SiteConfig:
    return SiteConfig(
        name=f"measure_{role}",
        role=role,
        synth=SynthConfig(
            preset=role,
            patients=patients,
            videos_per_patient=vpp,
            frames_per_video=frames,
            seed=seed,
            difficulty=difficulty,
        ),
    )


def render_site(site: SiteConfig, size: int) -> list[RenderedVideo]:
    return [render_video(j.spec) for j in plan_site(site, size)]


def fwhm(profile: np.ndarray) -> float:
    """Full width at half maximum (in samples, linear interpolation) of a peak at index 0 of a
    symmetric profile given for lags 0, 1, 2 …"""
    p = profile / profile[0]
    below = np.where(p < 0.5)[0]
    if not below.size:
        return float("nan")
    k = int(below[0])
    x = k - 1 + (p[k - 1] - 0.5) / (p[k - 1] - p[k])
    return 2.0 * float(x)


def speckle_fwhm_mm(videos: list[RenderedVideo]) -> tuple[float, float]:
    """Axial × lateral FWHM (mm) of the speckle autocorrelation in soft tissue above the bone."""
    ax, lat = [], []
    for v in videos:
        px, py = v.spacing_mm
        for t in range(0, len(v.frames), max(1, len(v.frames) // 4)):
            img, lab = v.frames[t].astype(float), v.labels[t]
            if not lab.any():
                continue
            top = int(np.min(np.argmax(lab > 0, axis=0)[lab.any(0)]))
            r0, r1 = int(1.2 / py), top - int(0.8 / py)
            if r1 - r0 < 8:
                continue
            patch = img[r0:r1]
            patch = patch - patch.mean(axis=1, keepdims=True)
            f = np.fft.fft2(patch, s=(2 * patch.shape[0], 2 * patch.shape[1]))
            ac = np.real(np.fft.ifft2(np.abs(f) ** 2))
            ax.append(fwhm(ac[: patch.shape[0] // 2, 0]) * py)
            lat.append(fwhm(ac[0, : patch.shape[1] // 2]) * px)
    return float(np.nanmedian(ax)), float(np.nanmedian(lat))


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits between two histograms."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def hist(videos: list[RenderedVideo]) -> np.ndarray:
    return sum(np.bincount(v.frames.ravel(), minlength=256).astype(float) for v in videos)


def gap_correlation(videos: list[RenderedVideo], gaps=(1, 5, 15, 30)) -> dict[int, float]:
    out = {}
    for g in gaps:
        cs = []
        for v in videos:
            f = v.frames.reshape(len(v.frames), -1).astype(float)
            for t in range(0, len(f) - g, 3):
                cs.append(np.corrcoef(f[t], f[t + g])[0, 1])
        out[g] = float(np.mean(cs))
    return out


def montage(src: list[RenderedVideo], tgt: list[RenderedVideo], path: Path, n: int = 4) -> None:
    """Rows: source frames, source with masks, target frames, target with masks."""
    from PIL import Image

    def tile(videos, overlay):
        cells = []
        for v in videos[:n]:
            t = len(v.frames) // 2
            f, lab = v.frames[t], v.labels[t]
            rgb = np.stack([f] * 3, -1).astype(float)
            if overlay:
                colours = {1: (255, 40, 40), 2: (40, 255, 40), 3: (60, 120, 255)}
                for k, c in colours.items():
                    m = lab == k
                    rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(c)
            cell = np.zeros((max(vv.frames.shape[1] for vv in src + tgt), f.shape[1], 3))
            cell[: f.shape[0]] = rgb
            cells.append(np.pad(cell, ((2, 2), (2, 2), (0, 0))))
        return np.concatenate(cells, 1)

    rows = [tile(src, False), tile(src, True), tile(tgt, False), tile(tgt, True)]
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, 0).astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--difficulty", type=float, default=None, help="default: the presets'")
    ap.add_argument("--montage", type=Path, default=Path("/tmp/phantom_montage.png"))
    a = ap.parse_args(argv)

    # 1. generation speed, writing PNGs as the site generator does
    with tempfile.TemporaryDirectory() as tmp:
        for role, seed in (("source", 1), ("target", 2)):
            site = _site(role, seed, 4, 3, 40, a.difficulty)
            t0 = time.perf_counter()
            synth_site(site, a.size, Path(tmp) / role, workers=a.workers, progress=False)
            dt = time.perf_counter() - t0
            print(
                f"speed {role:6s}: {480 / dt:6.1f} frames/s at width {a.size} on {a.workers} "
                "workers (480 frames, PNGs written)"
            )

    # 2.–4. domain shift and temporal coherence, rendered in memory
    src = render_site(_site("source", 11, 6, 2, 60, a.difficulty), a.size)
    tgt = render_site(_site("target", 12, 6, 2, 60, a.difficulty), a.size)
    for name, vids in (("lumify (source)", src), ("telemed (target)", tgt)):
        fa, fl = speckle_fwhm_mm(vids)
        print(f"speckle FWHM {name:17s}: axial {fa:.2f} mm x lateral {fl:.2f} mm")
    half = len(src) // 2  # within a domain: first half of the patients vs the second half
    hs_a, hs_b = hist(src[:half]), hist(src[half:])
    ht_a, ht_b = hist(tgt[:half]), hist(tgt[half:])
    print(
        f"histogram JS (bits): within lumify {js_bits(hs_a, hs_b):.4f}, within telemed "
        f"{js_bits(ht_a, ht_b):.4f}, across {js_bits(hs_a + hs_b, ht_a + ht_b):.4f}"
    )
    for name, vids in (("lumify", src), ("telemed", tgt)):
        c = gap_correlation(vids)
        print(
            f"frame correlation {name:8s}: " + ", ".join(f"gap {g}: {v:.3f}" for g, v in c.items())
        )
    mean_fg = lambda vs: np.mean([(v.labels > 0).mean() for v in vs])  # noqa: E731
    print(f"bone-mask share of pixels: lumify {mean_fg(src):.3f}, telemed {mean_fg(tgt):.3f}")
    montage(src[::2], tgt[::2], a.montage)
    print(f"montage: {a.montage}")


if __name__ == "__main__":
    main()
