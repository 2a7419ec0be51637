"""B-mode renderer: one video = a sweep over one phantom, seen through one device.

Per frame (on a 2× oversampled grid): echogenicity × coherent 3-D speckle, specular bone echo
with angle dependence, acoustic shadow and reverberation under bone, one forward FFT and two
inverse ones (PSF at focus and far, blended by depth, plus side-lobe haze), attenuation residual,
downsample, electronic noise growing with depth, log compression over the dynamic range, γ, then
the device's post-processing (speckle reduction + unsharp, or persistence + JPEG). Masks are exact
from the geometry (a band below the surface, or everything below it), with annotator noise that
grows with ``difficulty``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage

from simulations.phantom.device import DevicePreset, OperatorProfile
from simulations.phantom.geometry import Anatomy, fill_gaps, surface

OVERSAMPLE = 2
SPECKLE_SLICE_MM = 0.25  # elevation spacing of the seeded complex speckle slices
TOP_DB = 18.0  # display top (white) relative to the mean echo of unit-echogenicity tissue


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video (picklable, for worker processes)."""

    anatomy: Anatomy
    device: DevicePreset
    operator: OperatorProfile
    n_frames: int
    img_size: int  # output width in px; height follows the device's aspect ratio
    seed: int | tuple[int, ...]
    difficulty: float = 1.0  # the sites' default is common.config.DEFAULT_DIFFICULTY
    band_mm: float | None = 2.0  # None: label everything below the surface ("full")


@dataclass
class RenderedVideo:
    frames: np.ndarray  # (T, H, W) uint8
    labels: np.ndarray  # (T, H, W) uint8 (0 background, 1/2/3 bone labels)
    spacing_mm: tuple[float, float]  # (x, y) pixel spacing
    mm_per_frame: float
    frame_ms: float
    y_mm: np.ndarray  # (T,) elevation of each frame
    info: dict = field(default_factory=dict)


def frame_shape(device: DevicePreset, img_size: int) -> tuple[int, int]:
    """(H, W) of a rendered frame: width ``img_size``, height from the field of view's aspect."""
    h = max(8, int(round(img_size * device.fov_d_mm / device.fov_w_mm)))
    return h, img_size


def _smooth_series(rng: np.random.Generator, n: int, std: float, corr: float) -> np.ndarray:
    """A smooth random series of length n with standard deviation ``std`` (corr in samples)."""
    w = rng.standard_normal(n + 8 * int(corr) + 2)
    s = ndimage.gaussian_filter1d(w, corr, mode="wrap")[:n]
    sd = s.std() if n > 1 else 1.0
    return std * (s - s.mean()) / (sd if sd > 0 else 1.0) if n > 1 else np.zeros(n)


def _gauss_tf(nz: int, nx: int, d: float, sz: float, sx: float) -> np.ndarray:
    """Gaussian PSF transfer function on an (nz, nx) FFT grid with pixel size d (mm), σ in mm."""
    kz = sfft.fftfreq(nz, d)[:, None]
    kx = sfft.fftfreq(nx, d)[None, :]
    return np.exp(-2 * np.pi**2 * ((sz * kz) ** 2 + (sx * kx) ** 2))


class _Speckle:
    """Complex Gaussian slices seeded per ``SPECKLE_SLICE_MM`` in elevation, interpolated.

    Neighbouring frames share slices (near-duplicates); frames further apart than a slice or two
    decorrelate. Interpolation uses cos/sin weights so the speckle variance stays 1.
    """

    def __init__(self, seed: tuple[int, ...], shape: tuple[int, int]):
        self.seed = seed
        self.shape = shape
        self.cache: dict[int, np.ndarray] = {}

    def _slice(self, k: int) -> np.ndarray:
        if k not in self.cache:
            if len(self.cache) > 4:  # the sweep moves one way: drop the slice furthest behind
                self.cache.pop(min(self.cache, key=lambda j: -abs(j - k)))
            rng = np.random.default_rng(np.random.SeedSequence([*self.seed, 7, k + 1_000_000]))
            g = rng.standard_normal((2, *self.shape), dtype=np.float32)
            self.cache[k] = (g[0] + 1j * g[1]) * np.float32(np.sqrt(0.5))
        return self.cache[k]

    def at(self, y: float) -> np.ndarray:
        u = y / SPECKLE_SLICE_MM
        k = int(np.floor(u))
        t = u - k
        a, b = self._slice(k), self._slice(k + 1)
        return np.float32(np.cos(np.pi * t / 2)) * a + np.float32(np.sin(np.pi * t / 2)) * b


def _splat(
    arr: np.ndarray, zc: np.ndarray, width, amp: np.ndarray, dz: float, modulate: float = 0.0
):
    """Add amp·exp(−((z − zc)/width)²) per column into ``arr`` (rows near zc only, for speed).

    ``zc``/``amp``: (nx,) centre depth (mm) and amplitude per column; ``width`` scalar or (nx,).
    With ``modulate`` > 0 the added echo is multiplied by (1 + modulate·arr) (speckle on bone).
    """
    nz, nx = arr.shape
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), (nx,))
    k = int(np.ceil(3 * float(w.max()) / dz)) + 1
    centre = np.rint(zc / dz - 0.5).astype(np.int64)
    rows = centre[None, :] + np.arange(-k, k + 1)[:, None]
    cols = np.broadcast_to(np.arange(nx)[None, :], rows.shape)
    ok = (rows >= 0) & (rows < nz) & (amp[None, :] != 0)
    rows, cols = rows[ok], cols[ok]
    zr = (rows + 0.5) * dz
    val = (amp[cols] * np.exp(-(((zr - zc[cols]) / w[cols]) ** 2))).astype(np.float32)
    if modulate:
        arr[rows, cols] += val * (1 + modulate * arr[rows, cols])
    else:
        arr[rows, cols] += val


def render_video(spec: VideoSpec) -> RenderedVideo:
    """Render ``spec.n_frames`` frames and label maps of one sweep. Deterministic in ``spec.seed``."""
    a, dev, op, d = spec.anatomy, spec.device, spec.operator, spec.difficulty
    seed = tuple(spec.seed) if isinstance(spec.seed, tuple | list) else (int(spec.seed),)
    rng = np.random.default_rng(np.random.SeedSequence([*seed, 1]))
    T = spec.n_frames
    H, W = frame_shape(dev, spec.img_size)
    px = dev.fov_w_mm / W
    py = dev.fov_d_mm / H
    nz, nx = H * OVERSAMPLE, W * OVERSAMPLE
    ds = px / OVERSAMPLE  # sim pixel (square: lateral grid; depth grid uses py/OVERSAMPLE)
    dz = py / OVERSAMPLE
    zc = ((np.arange(nz) + 0.5) * dz).astype(np.float32)[:, None]  # (nz, 1) depth of sim rows
    zo = ((np.arange(H) + 0.5) * py)[:, None]  # output row depths

    # per-video device jitter (each domain varies within itself)
    j = dev.jitter
    gain_db = dev.gain_db + rng.normal(0, 2.0 * j)
    dr_db = dev.dynamic_range_db + rng.normal(0, 3.0 * j)
    focus = dev.fov_d_mm * rng.uniform(0.3, 0.55)
    noise_db = dev.noise_floor_db + rng.normal(0, 2.0 * j)
    refl = dev.bone_reflectivity * np.exp(rng.normal(0, 0.15 * j))

    # the sweep: elevation steps of 0.10–0.15 mm with wobble, lateral jitter, tilt
    mm_per_frame = float(rng.uniform(0.10, 0.15))
    ys = a.y_c + rng.uniform(-2.0, 2.0) + mm_per_frame * (np.arange(T) - (T - 1) / 2)
    ys = ys + _smooth_series(rng, T, 0.03, 4)
    xo = _smooth_series(rng, T, op.lateral_jitter_mm, 8)
    tilt = np.deg2rad(
        rng.normal(0, op.tilt_deg * d) + _smooth_series(rng, T, op.tilt_wobble_deg * d, 6)
    )
    off_p = min(0.9, op.offplane_p * d)
    off_u = _smooth_series(rng, T, 1.0, 3)
    offplane = off_u > np.quantile(off_u, 1 - off_p) if off_p > 0 and T > 1 else np.zeros(T, bool)
    contact = np.zeros(T)  # share of the width that lost contact, per frame
    contact_side = int(rng.integers(0, 2))
    if rng.random() < op.contact_loss_p * d and T > 1:
        t0 = int(rng.integers(0, T))
        t1 = min(T, t0 + max(1, int(T * rng.uniform(0.15, 0.5))))
        width = rng.uniform(0.12, 0.35)
        tt = np.arange(t0, t1)
        contact[t0:t1] = width * np.sin(np.pi * (tt - t0 + 0.5) / (t1 - t0)) ** 0.5

    # annotator style (difficulty): band thickness, offset, boundary wiggle
    band_scale = float(np.clip(1 + rng.normal(0, 0.12 * d), 0.6, 1.5))
    ann_off = float(rng.normal(0, 0.08 * d))

    # wide tissue grid for speckle and heterogeneity (tissue moves with the probe's lateral offset)
    margin = 2.0 + 4 * op.lateral_jitter_mm
    x_lo = -margin
    nxw = nx + int(np.ceil(2 * margin / ds))
    speck = _Speckle(seed, (nz, nxw))
    hz, hx = max(4, nz // 16), max(4, nxw // 16)
    het = ndimage.gaussian_filter(rng.standard_normal((hz, hx)), 1.5)
    het = ndimage.zoom(het / (het.std() + 1e-9), (nz / hz, nxw / hx), order=1)[:nz, :nxw]
    het = np.exp(0.22 * het).astype(np.float32)

    # PSFs: focus and far, each with side-lobe haze, normalised to unit speckle power
    tfs = []
    for sx in (dev.psf_lat_focus_mm, dev.psf_lat_far_mm):
        tf = _gauss_tf(nz, nx, ds, dev.psf_axial_mm * dz / ds, sx)
        tf = tf / np.sqrt(np.mean(tf**2))
        wide = _gauss_tf(nz, nx, ds, 1.2, 2.5)
        wide = wide / np.sqrt(np.mean(wide**2))
        tfs.append(((1 - dev.haze) * tf + dev.haze * wide).astype(np.complex64))
    wfar = np.clip(np.abs(zc - focus) / (0.5 * dev.fov_d_mm), 0, 1).astype(np.float32)
    att = (10 ** (dev.tgc_db_per_cm * (zc / 10.0) / 20)).astype(np.float32)
    # electronic noise: ``noise_floor_db`` below the display's top level, growing with depth
    noise_amp = 10 ** ((TOP_DB + noise_db - gain_db) / 20) * (1 + 1.5 * zo / dev.fov_d_mm)

    frames = np.zeros((T, H, W), np.uint8)
    labels = np.zeros((T, H, W), np.uint8)
    prev = None
    xs_rel = (np.arange(nx) + 0.5) * ds
    xo_rel = (np.arange(W) + 0.5) * px
    for t in range(T):
        x_t = xs_rel + xo[t]
        zs, lab = surface(a, x_t, ys[t])
        has = ~np.isnan(zs)
        zf = fill_gaps(zs).astype(np.float32)[None, :]
        slope = np.gradient(fill_gaps(zs), ds)
        theta = np.arctan(slope) + tilt[t]
        theta0 = np.deg2rad(24.0 / (0.6 + 0.4 * d))
        amp = np.exp(-((theta / theta0) ** 2)).astype(np.float32) * has
        echo_w = (0.06 + 0.06 * amp) * (2.0 if offplane[t] else 1.0)
        bone_amp = refl * amp * (0.3 if offplane[t] else 1.0)

        # echogenicity of soft tissue (amplitude scale)
        E = np.full((nz, nx), 0.35, np.float32)
        E[: int(a.skin_mm / dz)] = 1.6
        for s, ph in zip(a.septa, a.septa_phase, strict=True):
            sd = s + 0.3 * np.sin(2 * np.pi * x_t / 9.0 + ph)
            _splat(E, sd, 0.07, np.ones(nx), dz)
        top = zf - a.layer_gap - a.layer_mm
        inl = (zc >= top) & (zc < zf - a.layer_gap)
        rel = zc - top
        if a.tissue == "tendon":
            layer = 0.75 + 0.45 * np.cos((2 * np.pi / 0.35) * rel)
        else:
            c = np.cos((2 * np.pi / 1.1) * (rel + 0.25 * x_t[None, :].astype(np.float32)))
            c = np.maximum(c, 0) ** 2
            layer = 0.5 + 0.9 * c * c
        E = np.where(inl, layer.astype(np.float32), E)
        # cartilage: epiphysis cap and the physis / joint gaps are hypoechoic
        cap = (lab == 2)[None, :] & (zc > zf - a.cart_mm) & (zc < zf)
        gap = (~has)[None, :] & (zc > zf - 0.6)
        E = np.where(cap | gap, np.float32(0.08), E)
        x0 = int(round((xo[t] - x_lo) / ds))
        E *= het[:, x0 : x0 + nx]
        # acoustic shadow below bone (gaps: the sound reaches deeper bone ~2 mm further)
        zsh = np.where(has, zf[0], zf[0] + 2.0)[None, :]
        sh = np.clip((zsh + 0.2 - zc) * np.float32(1 / 0.2), 0, 1)
        E *= dev.shadow_floor + (1 - dev.shadow_floor) * sh

        sp = speck.at(ys[t])[:, x0 : x0 + nx]
        field_ = E * sp
        # coherent specular bone echo (speckle-modulated a little) + reverberation copies
        _splat(field_, zf[0], echo_w, bone_amp, dz, modulate=0.25)
        for k, r in ((2, dev.reverb), (3, dev.reverb**2)):
            _splat(field_, k * zf[0], 0.1, r * bone_amp, dz)

        # contact loss: the lost columns show only skin reverberation bands
        if contact[t] > 0:
            ncol = int(contact[t] * nx)
            cols = slice(0, ncol) if contact_side == 0 else slice(nx - ncol, nx)
            rev = 0.5 * np.exp(-zc / 3.0) * (np.cos(2 * np.pi * zc / 0.9) > 0.6)
            field_[:, cols] = (rev * sp[:, cols]).astype(np.complex64)

        F = sfft.fft2(field_, workers=1)
        env = np.abs((1 - wfar) * sfft.ifft2(F * tfs[0]) + wfar * sfft.ifft2(F * tfs[1]))
        inten = (env * att) ** 2
        inten = inten.reshape(H, OVERSAMPLE, W, OVERSAMPLE).mean((1, 3))
        n = noise_amp**2 * rng.exponential(1.0, (H, W))
        db = 10 * np.log10(inten + n + 1e-12) + gain_db
        v = np.clip((db - (TOP_DB - dr_db)) / dr_db, 0, 1) ** dev.gamma
        img = v * 255.0

        # device post-processing
        if dev.speckle_reduction > 0:
            img = (
                1 - dev.speckle_reduction
            ) * img + dev.speckle_reduction * ndimage.gaussian_filter(img, 1.0)
        if dev.unsharp > 0:
            img = img + dev.unsharp * (img - ndimage.gaussian_filter(img, 1.5))
        if dev.persistence > 0 and prev is not None:
            img = (1 - dev.persistence) * img + dev.persistence * prev
        prev = img
        out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if dev.jpeg_quality:
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, "JPEG", quality=int(dev.jpeg_quality))
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
        frames[t] = out

        # the annotation: exact geometry + annotator noise
        zso, labo = surface(a, xo_rel + xo[t], ys[t])
        wig = _smooth_series(rng, W, 0.06 * d, 6) if d > 0 else 0.0
        zso = zso + ann_off + wig
        lo = zso[None, :]
        inside = zo >= lo
        if spec.band_mm is not None:
            inside &= zo < lo + spec.band_mm * band_scale
        lab_img = np.where(inside, labo[None, :], 0).astype(np.uint8)
        if contact[t] > 0:  # an annotator does not label bone that is not visible
            ncol = int(contact[t] * W)
            if contact_side == 0:
                lab_img[:, :ncol] = 0
            else:
                lab_img[:, W - ncol :] = 0
        labels[t] = lab_img

    return RenderedVideo(
        frames=frames,
        labels=labels,
        spacing_mm=(px, py),
        mm_per_frame=mm_per_frame,
        frame_ms=dev.frame_ms,
        y_mm=ys,
        info={"offplane": offplane.tolist(), "contact": contact.tolist()},
    )
