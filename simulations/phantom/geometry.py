"""Phantom geometry: a wrist as bone height maps, sampled per video (units: mm).

Coordinates: x = along the radius (probe lateral, distal to the right), z = depth below the skin,
y = elevation = the sweep direction. Bones are height maps ``z_surface(x, y)``: metaphysis
(label 1) with a flare towards the physis, the physis gap (no bone), the epiphysis (label 2) as a
dome under a hypoechoic cartilage cap, then after a joint gap two carpal domes (label 3). A
transverse curvature ``(y - y_c)² / 2 R_y`` deepens the bone away from the crest so a sweep reshapes
it smoothly. See ``docs/data.md`` ("The phantom").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABEL_METAPHYSIS = 1
LABEL_EPIPHYSIS = 2
LABEL_CARPAL = 3
LABELS = {LABEL_METAPHYSIS: "metaphysis", LABEL_EPIPHYSIS: "epiphysis", LABEL_CARPAL: "carpal"}

VIEWS_ALL = ("dorsal", "proximal_dorsal", "radial", "volar", "proximal_volar")


@dataclass(frozen=True)
class ViewSpec:
    """Ranges a view draws its anatomy from.

    ``depth_mm``: metaphysis depth at the physis; ``physis_frac``: where the physis sits across the
    field of view (proximal views show more shaft); ``tissue``: the layer over the bone.
    """

    depth_mm: tuple[float, float]
    physis_frac: tuple[float, float]
    tissue: str  # "tendon" (fibrils following the bone) | "muscle" (pronator quadratus)


VIEW_SPECS: dict[str, ViewSpec] = {
    "dorsal": ViewSpec((5.0, 8.0), (0.38, 0.48), "tendon"),
    "proximal_dorsal": ViewSpec((5.0, 8.0), (0.70, 0.85), "tendon"),
    "radial": ViewSpec((4.0, 7.0), (0.42, 0.52), "tendon"),
    "volar": ViewSpec((8.0, 12.0), (0.38, 0.48), "muscle"),
    "proximal_volar": ViewSpec((9.0, 13.0), (0.70, 0.85), "muscle"),
}


@dataclass(frozen=True)
class Anatomy:
    """One video's wrist. All lengths in mm, x measured in the probe frame at sweep start."""

    view: str
    age: float
    z_meta: float  # metaphysis surface depth at the physis
    meta_slope: float  # dz/dx of the shaft (mm/mm)
    x_phys: float  # lateral start of the physis gap
    phys_gap: float  # ≈ 2.6 − 0.14·age, clipped 0.35–2.5
    flare_h: float
    flare_len: float
    epi_len: float
    epi_h: float
    epi_dz: float  # epiphysis base depth relative to z_meta
    cart_mm: float  # hypoechoic cartilage cap over the epiphysis
    joint_gap: float
    carpal_len: tuple[float, float]
    carpal_h: float
    carpal_dz: float
    r_y: float  # transverse radius of curvature
    y_c: float  # elevation of the crest
    fracture: str | None  # None | "buckle" | "break"
    frac_x: float
    frac_y: tuple[float, float]
    frac_size: float
    tissue: str
    skin_mm: float
    layer_gap: float  # fat between the tendon/muscle layer and the bone
    layer_mm: float  # tendon/muscle thickness
    septa: tuple[float, ...]  # depths of fat septa
    septa_phase: tuple[float, ...]


def physis_gap_mm(age: float) -> float:
    """Physis gap width from age (``docs/data.md``, "The phantom"): 2.6 − 0.14·age, clipped to
    [0.35, 2.5] mm."""
    return float(np.clip(2.6 - 0.14 * age, 0.35, 2.5))


def sample_anatomy(
    rng: np.random.Generator,
    view: str,
    fov_w_mm: float,
    age: float | None = None,
    fracture_p: float = 0.25,
) -> Anatomy:
    """Draw one video's anatomy for ``view`` in a field of view ``fov_w_mm`` wide.

    Raises:
        ValueError: unknown view.
    """
    if view not in VIEW_SPECS:
        raise ValueError(f"unknown view {view!r}; known: {sorted(VIEW_SPECS)}")
    vs = VIEW_SPECS[view]
    u = rng.uniform
    age = float(u(4.0, 16.0)) if age is None else float(age)
    z_meta = float(u(*vs.depth_mm))
    x_phys = float(u(*vs.physis_frac)) * fov_w_mm
    fracture = None
    r = rng.random()
    if r < fracture_p:
        fracture = "buckle" if r < fracture_p * 0.6 else "break"
    layer_mm = float(u(1.2, 2.2)) if vs.tissue == "tendon" else float(u(2.0, 3.5))
    layer_gap = float(u(0.2, 0.8))
    skin = float(u(0.5, 0.9))
    fat_bottom = max(skin + 0.6, z_meta - layer_gap - layer_mm - 0.3)
    n_septa = int(rng.integers(1, 4))
    septa = tuple(sorted(float(v) for v in u(skin + 0.3, fat_bottom, size=n_septa)))
    return Anatomy(
        view=view,
        age=age,
        z_meta=z_meta,
        meta_slope=float(u(-0.08, 0.08)),
        x_phys=x_phys,
        phys_gap=float(np.clip(physis_gap_mm(age) + rng.normal(0, 0.15), 0.35, 2.5)),
        flare_h=float(u(0.6, 1.8)),
        flare_len=float(u(2.0, 5.0)),
        epi_len=float(u(6.0, 9.0)),
        epi_h=float(u(0.6, 1.6)),
        epi_dz=float(u(-0.8, 0.4)),
        cart_mm=float(u(0.8, 1.8)),
        joint_gap=float(u(1.2, 2.8)),
        carpal_len=(float(u(4.0, 6.5)), float(u(4.0, 6.5))),
        carpal_h=float(u(0.8, 1.8)),
        carpal_dz=float(u(0.5, 2.5)),
        r_y=float(u(9.0, 16.0)),
        y_c=float(u(-2.0, 2.0)),
        fracture=fracture,
        frac_x=x_phys - float(u(3.0, 8.0)),
        frac_y=(float(u(-6.0, 0.0)), float(u(1.0, 6.0))),
        frac_size=float(u(0.4, 1.2)),
        tissue=vs.tissue,
        skin_mm=skin,
        layer_gap=layer_gap,
        layer_mm=layer_mm,
        septa=septa,
        septa_phase=tuple(float(v) for v in u(0, 2 * np.pi, size=n_septa)),
    )


def _dome(t: np.ndarray, power: float) -> np.ndarray:
    return np.sin(np.pi * np.clip(t, 0.0, 1.0)) ** power


def surface(a: Anatomy, x: np.ndarray, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Bone surface depth and label for lateral positions ``x`` (mm, shape (n,)) at elevation y.

    Returns:
        z: (n,) float depth in mm, NaN where there is no bone (physis, joint, fracture gap).
        label: (n,) uint8, 0 where z is NaN, else 1 metaphysis / 2 epiphysis / 3 carpal.
    """
    x = np.asarray(x, dtype=np.float64)
    z = np.full(x.shape, np.nan)
    lab = np.zeros(x.shape, np.uint8)

    # metaphysis: shaft slope, flare rising towards the physis, rounded edge diving into the gap
    m = x < a.x_phys
    xm = x[m]
    d = a.x_phys - xm
    zm = a.z_meta + a.meta_slope * (xm - a.x_phys) - a.flare_h * np.exp(-d / a.flare_len)
    zm = zm + 2.0 * np.clip(0.6 - d, 0.0, None) ** 2 / 0.6
    if a.fracture is not None:
        y0, y1 = a.frac_y
        wy = 0.5 * (np.tanh((y - y0) / 0.5) - np.tanh((y - y1) / 0.5))
        if a.fracture == "buckle":
            zm = zm - a.frac_size * wy * np.exp(-(((xm - a.frac_x) / 0.9) ** 2))
        elif wy > 0.5:  # cortical break with step-off of the proximal fragment
            zm = np.where(xm < a.frac_x, zm + 0.6 * a.frac_size, zm)
            zm = np.where(np.abs(xm - a.frac_x) < 0.3, np.nan, zm)
    z[m] = zm
    lab[m] = LABEL_METAPHYSIS

    # epiphysis dome after the physis gap
    xe0 = a.x_phys + a.phys_gap
    e = (x >= xe0) & (x < xe0 + a.epi_len)
    base = a.z_meta - 0.6 * a.flare_h + a.epi_dz
    z[e] = (
        base
        - a.epi_h * _dome((x[e] - xe0) / a.epi_len, 0.6)
        + 1.2 * (1 - _dome((x[e] - xe0) / a.epi_len, 0.25))
    )
    lab[e] = LABEL_EPIPHYSIS

    # two carpal domes after the joint gap
    xc = xe0 + a.epi_len + a.joint_gap
    for length in a.carpal_len:
        c = (x >= xc) & (x < xc + length)
        t = (x[c] - xc) / length
        z[c] = base + a.carpal_dz - a.carpal_h * _dome(t, 0.7) + 0.6 * (1 - _dome(t, 0.3))
        lab[c] = LABEL_CARPAL
        xc += length + 0.5

    z = z + (y - a.y_c) ** 2 / (2 * a.r_y)
    lab[np.isnan(z)] = 0
    return z, lab


def fill_gaps(z: np.ndarray) -> np.ndarray:
    """Interpolate NaN gaps of a surface (for soft-tissue layers that follow the bone)."""
    ok = ~np.isnan(z)
    if ok.all():
        return z
    if not ok.any():
        return np.full_like(z, 10.0)
    idx = np.arange(z.size)
    return np.interp(idx, idx[ok], z[ok])
