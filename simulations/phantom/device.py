"""Device presets (imaging chain), operator profiles and site presets.

The numbers are plausible, not vendor-measured (``docs/data.md``, table "Device presets").
``lumify`` plays the labeled source site, ``telemed`` the unlabeled target. Define more with
:func:`register_device` / :func:`register_site_preset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simulations.phantom.geometry import VIEWS_ALL


@dataclass(frozen=True)
class DevicePreset:
    """One probe + scanner's imaging chain. Lengths in mm, levels in dB."""

    name: str
    fov_w_mm: float  # field of view width (lateral)
    fov_d_mm: float  # depth
    psf_axial_mm: float  # Gaussian σ
    psf_lat_focus_mm: float
    psf_lat_far_mm: float
    dynamic_range_db: float
    gamma: float
    gain_db: float
    tgc_db_per_cm: float  # residual after TGC (negative: deeper is darker)
    noise_floor_db: float  # electronic noise relative to unit tissue echo
    haze: float  # side-lobe haze (wide PSF share)
    reverb: float  # bone reverberation copies
    bone_reflectivity: float
    shadow_floor: float  # echo left below bone
    speckle_reduction: float = 0.0  # 0–1 blend with a smoothed image
    unsharp: float = 0.0
    persistence: float = 0.0  # 0–1 blend with the previous frame
    jpeg_quality: int | None = None
    frame_ms: float = 50.0
    jitter: float = 1.0  # scale of the per-video variation of gain, DR, focus, noise


@dataclass(frozen=True)
class OperatorProfile:
    """How the probe is held. Effects scale with the synth ``difficulty``."""

    name: str
    tilt_deg: float  # per-video tilt σ (specular dropout)
    tilt_wobble_deg: float  # per-frame smooth wobble σ
    lateral_jitter_mm: float
    contact_loss_p: float  # chance a video has a contact-loss episode
    offplane_p: float  # share of frames off the bone's plane


@dataclass(frozen=True)
class SitePreset:
    """What a synthetic site is made of: a device, an operator and the views scanned."""

    name: str
    device: str
    operator: str
    views: tuple[str, ...] = field(default=VIEWS_ALL)
    fracture_p: float = 0.25
    difficulty: float = 1.0  # a site's synth.difficulty unless it sets one


LUMIFY = DevicePreset(
    name="lumify",
    fov_w_mm=34.0,
    fov_d_mm=30.0,
    psf_axial_mm=0.10,
    psf_lat_focus_mm=0.18,
    psf_lat_far_mm=0.32,
    dynamic_range_db=60.0,
    gamma=1.6,
    gain_db=0.0,
    tgc_db_per_cm=-0.3,
    noise_floor_db=-50.0,
    haze=0.01,
    reverb=0.002,
    bone_reflectivity=9.0,
    shadow_floor=0.03,
    speckle_reduction=0.55,
    unsharp=0.6,
    persistence=0.0,
    jpeg_quality=None,
    frame_ms=50.0,
)

TELEMED = DevicePreset(
    name="telemed",
    fov_w_mm=40.0,
    fov_d_mm=35.0,
    psf_axial_mm=0.17,
    psf_lat_focus_mm=0.32,
    psf_lat_far_mm=0.60,
    dynamic_range_db=48.0,
    gamma=1.25,
    gain_db=-2.0,
    tgc_db_per_cm=-1.2,
    noise_floor_db=-39.0,
    haze=0.05,
    reverb=0.025,
    bone_reflectivity=5.5,
    shadow_floor=0.08,
    speckle_reduction=0.0,
    unsharp=0.0,
    persistence=0.35,
    jpeg_quality=55,
    frame_ms=1000.0 / 30.0,
)

EXPERT = OperatorProfile("expert", 2.0, 1.0, 0.25, 0.0, 0.0)
NOVICE = OperatorProfile("novice", 9.0, 4.0, 0.6, 0.35, 0.12)

DEVICES: dict[str, DevicePreset] = {}
OPERATORS: dict[str, OperatorProfile] = {}
SITE_PRESETS: dict[str, SitePreset] = {}


def register_device(preset: DevicePreset) -> DevicePreset:
    """Make ``preset`` available by name (overwrites a preset of the same name)."""
    DEVICES[preset.name] = preset
    return preset


def register_operator(profile: OperatorProfile) -> OperatorProfile:
    OPERATORS[profile.name] = profile
    return profile


def register_site_preset(preset: SitePreset) -> SitePreset:
    """Make a site preset usable as ``synth.preset`` in an experiment YAML."""
    SITE_PRESETS[preset.name] = preset
    return preset


def get_device(name: str) -> DevicePreset:
    """The device preset called ``name``. Raises KeyError naming the known ones."""
    try:
        return DEVICES[name]
    except KeyError:
        raise KeyError(f"unknown device preset {name!r}; known: {sorted(DEVICES)}") from None


def get_operator(name: str) -> OperatorProfile:
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"unknown operator profile {name!r}; known: {sorted(OPERATORS)}") from None


def get_site_preset(name: str) -> SitePreset:
    """The site preset ``name`` (source, target, or a device name such as lumify/telemed)."""
    try:
        return SITE_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown synth preset {name!r}; known: {sorted(SITE_PRESETS)}") from None


for _d in (LUMIFY, TELEMED):
    register_device(_d)
for _o in (EXPERT, NOVICE):
    register_operator(_o)
# The target's difficulty is calibrated so the lower→upper DSC gap is >= 0.10 on every seed
# (docs/results.md, "Calibrating the phantom"); the source is scanned by an expert.
_TARGET_VIEWS = tuple(v for v in VIEWS_ALL if v != "radial")
for _name, _device in (("source", "lumify"), ("lumify", "lumify")):
    register_site_preset(SitePreset(_name, _device, "expert", VIEWS_ALL, difficulty=1.0))
for _name, _device in (("target", "telemed"), ("telemed", "telemed")):
    register_site_preset(SitePreset(_name, _device, "novice", _TARGET_VIEWS, difficulty=2.0))
