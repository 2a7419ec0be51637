"""B-mode renderer: one video = a sweep over one phantom, seen through one device.

Per frame (on a 2× oversampled grid): echogenicity × coherent 3-D speckle, specular bone echo
with angle dependence, acoustic shadow and reverberation under bone, one forward FFT and two
inverse ones (PSF at focus and far, blended by depth, plus side-lobe haze), attenuation residual,
downsample, electronic noise growing with depth, log compression over the dynamic range, γ, then
the device's post-processing (speckle reduction + unsharp, or persistence + JPEG). Masks are exact
from the geometry (a band below the surface, or everything below it), with the annotator's noise
(``annotation_noise``), which is independent of how hard the frames are to read (``difficulty``).
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
HAZE_SIGMA_MM = (1.2, 2.5)  # (axial, lateral) σ of the side-lobe haze, the widest PSF


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video (picklable, for worker processes)."""

    anatomy: Anatomy
    device: DevicePreset
    operator: OperatorProfile
    n_frames: int
    img_size: int  # output width in px; height follows the device's aspect ratio
    seed: int | tuple[int, ...]
    difficulty: float = 1.0  # the sites' default is their preset's
    annotation_noise: float = 1.0  # the sites' default is common.config.DEFAULT_ANNOTATION_NOISE
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


@dataclass(frozen=True)
class _Grid:
    """The output pixel grid and the ``OVERSAMPLE``× finer simulation grid of one device."""

    H: int  # output rows
    W: int  # output columns
    px: float  # output pixel width (mm)
    py: float  # output pixel height (mm)
    nz: int  # simulation rows
    nx: int  # simulation columns
    fz: int  # FFT rows: nz plus a zero margin, so the PSF does not wrap the top into the bottom
    fx: int  # FFT columns: nx plus a zero margin (likewise left and right)
    ds: float  # simulation pixel width (mm); the lateral grid is square in ds
    dz: float  # simulation pixel height (mm)
    zc: np.ndarray  # (nz, 1) float32 depth of the simulation rows
    zo: np.ndarray  # (H, 1) depth of the output rows


def _grid(dev: DevicePreset, img_size: int) -> _Grid:
    """The output and simulation grids for frames ``img_size`` px wide seen through ``dev``."""
    H, W = frame_shape(dev, img_size)
    px = dev.fov_w_mm / W
    py = dev.fov_d_mm / H
    nz, nx = H * OVERSAMPLE, W * OVERSAMPLE
    ds = px / OVERSAMPLE  # sim pixel (square: lateral grid; depth grid uses py/OVERSAMPLE)
    dz = py / OVERSAMPLE
    zc = ((np.arange(nz) + 0.5) * dz).astype(np.float32)[:, None]  # (nz, 1) depth of sim rows
    zo = ((np.arange(H) + 0.5) * py)[:, None]  # output row depths
    # The beamforming convolution is done by FFT, which is circular: without a margin the widest
    # PSF (the haze) would fold the bright near field into the last rows, and draw a bright line
    # along the bottom of every frame that looks like a bone surface over the padding below it.
    fz = sfft.next_fast_len(nz + int(np.ceil(3 * HAZE_SIGMA_MM[0] / ds)))  # the PSFs use ds
    fx = sfft.next_fast_len(nx + int(np.ceil(3 * HAZE_SIGMA_MM[1] / ds)))
    return _Grid(H, W, px, py, nz, nx, fz, fx, ds, dz, zc, zo)


@dataclass(frozen=True)
class _Settings:
    """One video's device settings: the preset's, jittered (each domain varies within itself)."""

    gain_db: float
    dr_db: float  # dynamic range
    focus: float  # focal depth (mm)
    noise_db: float  # electronic noise floor
    refl: float  # bone reflectivity


def _draw_settings(rng: np.random.Generator, dev: DevicePreset) -> _Settings:
    """Jitter the preset's gain, dynamic range, focus, noise floor and bone reflectivity."""
    j = dev.jitter
    gain_db = dev.gain_db + rng.normal(0, 2.0 * j)
    dr_db = dev.dynamic_range_db + rng.normal(0, 3.0 * j)
    focus = dev.fov_d_mm * rng.uniform(0.3, 0.55)
    noise_db = dev.noise_floor_db + rng.normal(0, 2.0 * j)
    refl = dev.bone_reflectivity * np.exp(rng.normal(0, 0.15 * j))
    return _Settings(gain_db, dr_db, focus, noise_db, refl)


@dataclass(frozen=True)
class _Sweep:
    """How the operator moves the probe over the ``T`` frames of one video."""

    mm_per_frame: float
    ys: np.ndarray  # (T,) elevation of each frame (mm)
    xo: np.ndarray  # (T,) lateral offset of the probe (mm)
    tilt: np.ndarray  # (T,) probe tilt (rad)
    offplane: np.ndarray  # (T,) bool: the frame misses the bone's plane
    contact: np.ndarray  # (T,) share of the width that lost contact
    contact_side: int  # 0: the lost share is on the left, 1: on the right


def _draw_sweep(
    rng: np.random.Generator, a: Anatomy, op: OperatorProfile, d: float, T: int
) -> _Sweep:
    """The sweep: elevation steps of 0.10–0.15 mm with wobble, lateral jitter, tilt, off-plane
    frames and an optional contact-loss episode (more of them with difficulty ``d``)."""
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
    contact, contact_side = _draw_contact_loss(rng, op, d, T)
    return _Sweep(mm_per_frame, ys, xo, tilt, offplane, contact, contact_side)


def _draw_contact_loss(
    rng: np.random.Generator, op: OperatorProfile, d: float, T: int
) -> tuple[np.ndarray, int]:
    """(share of the width that lost contact per frame, side): at most one episode per video,
    rising and falling smoothly over 15–50 % of the frames."""
    contact = np.zeros(T)  # share of the width that lost contact, per frame
    contact_side = int(rng.integers(0, 2))
    if rng.random() < op.contact_loss_p * d and T > 1:
        t0 = int(rng.integers(0, T))
        t1 = min(T, t0 + max(1, int(T * rng.uniform(0.15, 0.5))))
        width = rng.uniform(0.12, 0.35)
        tt = np.arange(t0, t1)
        contact[t0:t1] = width * np.sin(np.pi * (tt - t0 + 0.5) / (t1 - t0)) ** 0.5
    return contact, contact_side


def _draw_annotator_style(rng: np.random.Generator, noise: float) -> tuple[float, float]:
    """(band thickness scale, depth offset in mm) of this video's annotator (noise ``noise``)."""
    band_scale = float(np.clip(1 + rng.normal(0, 0.12 * noise), 0.6, 1.5))
    ann_off = float(rng.normal(0, 0.08 * noise))
    return band_scale, ann_off


def _tissue_maps(
    rng: np.random.Generator, seed: tuple[int, ...], op: OperatorProfile, g: _Grid
) -> tuple[_Speckle, np.ndarray, float]:
    """(speckle, heterogeneity, left edge in mm) on a tissue grid wider than the field of view:
    the tissue stays put while the probe's lateral offset moves the window over it."""
    margin = 2.0 + 4 * op.lateral_jitter_mm
    x_lo = -margin
    nxw = g.nx + int(np.ceil(2 * margin / g.ds))
    speck = _Speckle(seed, (g.nz, nxw))
    hz, hx = max(4, g.nz // 16), max(4, nxw // 16)
    het = ndimage.gaussian_filter(rng.standard_normal((hz, hx)), 1.5)
    het = ndimage.zoom(het / (het.std() + 1e-9), (g.nz / hz, nxw / hx), order=1)[: g.nz, :nxw]
    het = np.exp(0.22 * het).astype(np.float32)
    return speck, het, x_lo


@dataclass(frozen=True)
class _Optics:
    """What the probe's optics and electronics do, per simulation or output row."""

    tfs: list[np.ndarray]  # PSF transfer functions at the focus and far
    wfar: np.ndarray  # (nz, 1) weight of the far PSF
    att: np.ndarray  # (nz, 1) attenuation residual (amplitude)
    noise_amp: np.ndarray  # (H, 1) electronic noise amplitude


def _psf_transfer_functions(dev: DevicePreset, g: _Grid) -> list[np.ndarray]:
    """PSFs at the focus and far, each with side-lobe haze, normalised to unit speckle power."""
    tfs = []
    for sx in (dev.psf_lat_focus_mm, dev.psf_lat_far_mm):
        tf = _gauss_tf(g.fz, g.fx, g.ds, dev.psf_axial_mm * g.dz / g.ds, sx)
        tf = tf / np.sqrt(np.mean(tf**2))
        wide = _gauss_tf(g.fz, g.fx, g.ds, *HAZE_SIGMA_MM)
        wide = wide / np.sqrt(np.mean(wide**2))
        tfs.append(((1 - dev.haze) * tf + dev.haze * wide).astype(np.complex64))
    return tfs


def _optics(dev: DevicePreset, g: _Grid, s: _Settings) -> _Optics:
    """The PSFs, their depth blend around the focus, attenuation residual and noise amplitude."""
    tfs = _psf_transfer_functions(dev, g)
    wfar = np.clip(np.abs(g.zc - s.focus) / (0.5 * dev.fov_d_mm), 0, 1).astype(np.float32)
    att = (10 ** (dev.tgc_db_per_cm * (g.zc / 10.0) / 20)).astype(np.float32)
    # electronic noise: ``noise_floor_db`` below the display's top level, growing with depth
    noise_amp = 10 ** ((TOP_DB + s.noise_db - s.gain_db) / 20) * (1 + 1.5 * g.zo / dev.fov_d_mm)
    return _Optics(tfs, wfar, att, noise_amp)


@dataclass(frozen=True)
class _Bone:
    """The bone surface under one frame's simulation columns and its specular echo."""

    has: np.ndarray  # (nx,) bool: bone under the column (False in physis / joint gaps)
    zf: np.ndarray  # (1, nx) float32 surface depth, gaps filled
    lab: np.ndarray  # (nx,) bone label per column
    echo_w: np.ndarray  # (nx,) echo width (mm)
    amp: np.ndarray  # (nx,) echo amplitude


def _bone_echo(
    a: Anatomy,
    x_t: np.ndarray,
    y: float,
    tilt: float,
    offplane: bool,
    d: float,
    ds: float,
    refl: float,
) -> _Bone:
    """The bone surface at elevation ``y`` and its echo: strongest where the surface faces the
    probe, wider and weaker when the frame is off-plane."""
    zs, lab = surface(a, x_t, y)
    has = ~np.isnan(zs)
    zf = fill_gaps(zs).astype(np.float32)[None, :]
    slope = np.gradient(fill_gaps(zs), ds)
    theta = np.arctan(slope) + tilt
    theta0 = np.deg2rad(24.0 / (0.6 + 0.4 * d))
    amp = np.exp(-((theta / theta0) ** 2)).astype(np.float32) * has
    echo_w = (0.06 + 0.06 * amp) * (2.0 if offplane else 1.0)
    bone_amp = refl * amp * (0.3 if offplane else 1.0)
    return _Bone(has, zf, lab, echo_w, bone_amp)


def _tissue_layer(a: Anatomy, rel: np.ndarray, x_t: np.ndarray) -> np.ndarray:
    """Echogenicity of the layer over the bone at depth ``rel`` below its top: tendon fibrils, or
    the oblique fibre pattern of muscle."""
    if a.tissue == "tendon":
        return 0.75 + 0.45 * np.cos((2 * np.pi / 0.35) * rel)
    c = np.cos((2 * np.pi / 1.1) * (rel + 0.25 * x_t[None, :].astype(np.float32)))
    c = np.maximum(c, 0) ** 2
    return 0.5 + 0.9 * c * c


def _echogenicity(
    a: Anatomy,
    g: _Grid,
    x_t: np.ndarray,
    bone: _Bone,
    het: np.ndarray,
    shadow_floor: float,
) -> np.ndarray:
    """(nz, nx) float32 soft-tissue echogenicity (amplitude scale): skin, septa, the layer over
    the bone, hypoechoic cartilage and gaps, heterogeneity ``het`` and the acoustic shadow."""
    nz, nx, dz, zc, zf = g.nz, g.nx, g.dz, g.zc, bone.zf
    E = np.full((nz, nx), 0.35, np.float32)
    E[: int(a.skin_mm / dz)] = 1.6
    for s, ph in zip(a.septa, a.septa_phase, strict=True):
        sd = s + 0.3 * np.sin(2 * np.pi * x_t / 9.0 + ph)
        _splat(E, sd, 0.07, np.ones(nx), dz)
    top = zf - a.layer_gap - a.layer_mm
    inl = (zc >= top) & (zc < zf - a.layer_gap)
    layer = _tissue_layer(a, zc - top, x_t)
    E = np.where(inl, layer.astype(np.float32), E)
    # cartilage: epiphysis cap and the physis / joint gaps are hypoechoic
    cap = (bone.lab == 2)[None, :] & (zc > zf - a.cart_mm) & (zc < zf)
    gap = (~bone.has)[None, :] & (zc > zf - 0.6)
    E = np.where(cap | gap, np.float32(0.08), E)
    E *= het
    # acoustic shadow below bone (gaps: the sound reaches deeper bone ~2 mm further)
    zsh = np.where(bone.has, zf[0], zf[0] + 2.0)[None, :]
    sh = np.clip((zsh + 0.2 - zc) * np.float32(1 / 0.2), 0, 1)
    E *= shadow_floor + (1 - shadow_floor) * sh
    return E


def _scattering_field(
    E: np.ndarray, sp: np.ndarray, bone: _Bone, reverb: float, dz: float
) -> np.ndarray:
    """Tissue echogenicity × speckle, plus the coherent specular bone echo (speckle-modulated a
    little) and its reverberation copies at 2× and 3× the depth."""
    field_ = E * sp
    _splat(field_, bone.zf[0], bone.echo_w, bone.amp, dz, modulate=0.25)
    for k, r in ((2, reverb), (3, reverb**2)):
        _splat(field_, k * bone.zf[0], 0.1, r * bone.amp, dz)
    return field_


def _lose_contact(
    field_: np.ndarray, sp: np.ndarray, zc: np.ndarray, share: float, side: int
) -> None:
    """Contact loss (in place): the lost ``share`` of the columns shows only skin reverberation."""
    if share > 0:
        nx = field_.shape[1]
        ncol = int(share * nx)
        cols = slice(0, ncol) if side == 0 else slice(nx - ncol, nx)
        rev = 0.5 * np.exp(-zc / 3.0) * (np.cos(2 * np.pi * zc / 0.9) > 0.6)
        field_[:, cols] = (rev * sp[:, cols]).astype(np.complex64)


def _beamform(field_: np.ndarray, optics: _Optics, g: _Grid) -> np.ndarray:
    """(H, W) echo intensity: one forward FFT (zero-padded to the FFT grid), the two PSFs blended
    by depth, attenuation residual, envelope squared and downsampled to the output grid."""
    F = sfft.fft2(field_, s=(g.fz, g.fx), workers=1)
    tfs, wfar = optics.tfs, optics.wfar
    near, far = (sfft.ifft2(F * tf, workers=1)[: g.nz, : g.nx] for tf in tfs)
    env = np.abs((1 - wfar) * near + wfar * far)
    inten = (env * optics.att) ** 2
    return inten.reshape(g.H, OVERSAMPLE, g.W, OVERSAMPLE).mean((1, 3))


def _log_compress(inten: np.ndarray, noise: np.ndarray, s: _Settings, gamma: float) -> np.ndarray:
    """Grey levels 0–255 (float): intensity + noise in dB, over the dynamic range, then γ."""
    db = 10 * np.log10(inten + noise + 1e-12) + s.gain_db
    v = np.clip((db - (TOP_DB - s.dr_db)) / s.dr_db, 0, 1) ** gamma
    return v * 255.0


def _post_process(
    img: np.ndarray, prev: np.ndarray | None, dev: DevicePreset
) -> tuple[np.ndarray, np.ndarray]:
    """The device's post-processing: speckle reduction, unsharp mask, persistence with ``prev``
    and JPEG. Returns (the float image the next frame's persistence uses, the uint8 frame)."""
    if dev.speckle_reduction > 0:
        img = (1 - dev.speckle_reduction) * img + dev.speckle_reduction * ndimage.gaussian_filter(
            img, 1.0
        )
    if dev.unsharp > 0:
        img = img + dev.unsharp * (img - ndimage.gaussian_filter(img, 1.5))
    if dev.persistence > 0 and prev is not None:
        img = (1 - dev.persistence) * img + dev.persistence * prev
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if dev.jpeg_quality:
        out = _jpeg_round_trip(out, int(dev.jpeg_quality))
    return img, out


def _jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 frame as JPEG at ``quality`` and decode it again (grey)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _annotate(
    rng: np.random.Generator,
    a: Anatomy,
    g: _Grid,
    xo_rel: np.ndarray,
    sweep: _Sweep,
    t: int,
    noise: float,
    style: tuple[float, float],
    band_mm: float | None,
) -> np.ndarray:
    """(H, W) uint8 label map of frame ``t``: the exact geometry under the output columns with the
    annotator's offset and boundary wiggle, a band of ``band_mm`` (× the annotator's scale) or
    everything below the surface (None), and nothing where contact was lost."""
    band_scale, ann_off = style
    zso, labo = surface(a, xo_rel + sweep.xo[t], sweep.ys[t])
    wig = _smooth_series(rng, g.W, 0.06 * noise, 6) if noise > 0 else 0.0
    zso = zso + ann_off + wig
    lo = zso[None, :]
    inside = g.zo >= lo
    if band_mm is not None:
        inside &= g.zo < lo + band_mm * band_scale
    lab_img = np.where(inside, labo[None, :], 0).astype(np.uint8)
    if sweep.contact[t] > 0:  # an annotator does not label bone that is not visible
        ncol = int(sweep.contact[t] * g.W)
        if sweep.contact_side == 0:
            lab_img[:, :ncol] = 0
        else:
            lab_img[:, g.W - ncol :] = 0
    return lab_img


def render_video(spec: VideoSpec) -> RenderedVideo:
    """Render ``spec.n_frames`` frames and label maps of one sweep (deterministic in its seed).

    The image's random draws come in a fixed order from one generator: device settings, sweep,
    tissue heterogeneity, then per frame the electronic noise. The annotator (style, then per frame
    the boundary wiggle) draws from a second one, so annotation noise never changes the image.
    """
    a, dev, op, d = spec.anatomy, spec.device, spec.operator, spec.difficulty
    seed = tuple(spec.seed) if isinstance(spec.seed, tuple | list) else (int(spec.seed),)
    rng = np.random.default_rng(np.random.SeedSequence([*seed, 1]))
    annotator = np.random.default_rng(np.random.SeedSequence([*seed, 2]))
    T = spec.n_frames
    g = _grid(dev, spec.img_size)
    settings = _draw_settings(rng, dev)
    sweep = _draw_sweep(rng, a, op, d, T)
    style = _draw_annotator_style(annotator, spec.annotation_noise)
    speck, het, x_lo = _tissue_maps(rng, seed, op, g)
    optics = _optics(dev, g, settings)

    frames = np.zeros((T, g.H, g.W), np.uint8)
    labels = np.zeros((T, g.H, g.W), np.uint8)
    prev = None
    xs_rel = (np.arange(g.nx) + 0.5) * g.ds
    xo_rel = (np.arange(g.W) + 0.5) * g.px
    for t in range(T):
        x_t = xs_rel + sweep.xo[t]
        x0 = int(round((sweep.xo[t] - x_lo) / g.ds))
        bone = _bone_echo(
            a, x_t, sweep.ys[t], sweep.tilt[t], sweep.offplane[t], d, g.ds, settings.refl
        )
        E = _echogenicity(a, g, x_t, bone, het[:, x0 : x0 + g.nx], dev.shadow_floor)
        sp = speck.at(sweep.ys[t])[:, x0 : x0 + g.nx]
        field_ = _scattering_field(E, sp, bone, dev.reverb, g.dz)
        _lose_contact(field_, sp, g.zc, sweep.contact[t], sweep.contact_side)
        inten = _beamform(field_, optics, g)
        noise = optics.noise_amp**2 * rng.exponential(1.0, (g.H, g.W))
        img = _log_compress(inten, noise, settings, dev.gamma)
        prev, frames[t] = _post_process(img, prev, dev)
        labels[t] = _annotate(
            annotator, a, g, xo_rel, sweep, t, spec.annotation_noise, style, spec.band_mm
        )

    return RenderedVideo(
        frames=frames,
        labels=labels,
        spacing_mm=(g.px, g.py),
        mm_per_frame=sweep.mm_per_frame,
        frame_ms=dev.frame_ms,
        y_mm=sweep.ys,
        info={"offplane": sweep.offplane.tolist(), "contact": sweep.contact.tolist()},
    )
