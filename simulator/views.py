"""Anatomy of the simulated views and their findings, painted on a :class:`~.bmode.Canvas`.

Each view samples its random anatomy once (:func:`sample_anatomy`), then paints it at
any time ``t`` (seconds), so cine loops keep the same patient while breathing, the
heart beat and probe drift move it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from simulator.bmode import BeamGeometry, BodyPose, Canvas
from simulator.vendors import ProbeKind, VendorStyle

logger = logging.getLogger(__name__)


class View(StrEnum):
    """Simulated standard views (values are the ``view`` labels)."""

    ABDOMEN = "abdomen"
    """Right upper quadrant: liver with vessels, right kidney, diaphragm (convex probe)."""
    THYROID_TRANSVERSE = "thyroid_transverse"
    """Both thyroid lobes, isthmus, trachea with shadow, carotids (linear probe)."""
    THYROID_LONGITUDINAL = "thyroid_longitudinal"
    """One elongated thyroid lobe (linear probe)."""
    CARDIAC_4CH = "cardiac_4ch"
    """Apical four-chamber view (phased array)."""
    LUNG = "lung"
    """Intercostal lung view: ribs, pleural line and the lung pattern."""


class NoduleClass(StrEnum):
    """Thyroid nodule ground truth (``nodule`` label)."""

    NONE = "none"
    """No nodule in the image."""
    BENIGN = "benign"
    """Nodule with mostly benign (low TI-RADS) features."""
    MALIGNANT = "malignant"
    """Nodule with mostly suspicious (high TI-RADS) features."""


class LungPattern(StrEnum):
    """Lung ultrasound ground truth (``lung_pattern`` label)."""

    NORMAL = "normal"
    """Pleural line with sliding and horizontal A-line reverberations."""
    B_LINES = "b_lines"
    """Three or more vertical comet-tail artefacts reaching the bottom of the image."""
    CONSOLIDATION = "consolidation"
    """Tissue-like (hepatised) subpleural lung with air bronchograms."""


VIEWS: tuple[str, ...] = tuple(v.value for v in View)
"""The view labels, in a fixed order."""

THYROID_VIEWS = frozenset({View.THYROID_TRANSVERSE.value, View.THYROID_LONGITUDINAL.value})

# Backscattered intensity relative to liver parenchyma.
BLOOD = 6e-4
FAT = 0.35
MUSCLE = 0.22
THYROID = 2.4
MYOCARDIUM = 0.55
AIR_ATTEN = 25.0
BONE_ATTEN = 10.0


@dataclass
class Anatomy:
    """Sampled random anatomy of one view, ready to paint at any time point."""

    view: str
    geometry: BeamGeometry
    frequency_mhz: float
    focus_mm: float
    background: float
    paint: Callable[[Canvas, float], None]
    pose: Callable[[float], BodyPose]
    labels: dict[str, str | None]
    findings: dict[str, Any] = field(default_factory=dict)
    calipers: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)
    """Candidate caliper pairs (physical mm, body frame) for measurement overlays."""
    decorrelation: float = 0.15
    """Speckle decorrelation between consecutive cine frames."""

    @property
    def probe(self) -> ProbeKind:
        """Probe kind of the view."""
        return self.geometry.kind


def _fluid_atten(freq: float) -> float:
    """Extra attenuation of fluid: it cancels most of the nominal tissue attenuation."""
    return -0.9 * 0.1 * freq


def _skin_and_wall(c: Canvas, layers: list[tuple[float, float]], tex: np.ndarray) -> float:
    """Paint probe-fixed skin and wall layers ``[(thickness, echo), ...]``; return their depth."""
    c.layer(-5.0, 0.6, echo=2.5, edge=0.3)
    c.polyline_band(np.array([-200.0, 200.0]), np.array([0.5, 0.5]), 0.5, coherent=1.5, body=False)
    z = 0.6
    for thick, echo in layers:
        c.layer(z, z + thick, echo=echo, edge=0.4, texture=tex)
        c.polyline_band(np.array([-200.0, 200.0]), np.array([z, z]), 0.5, coherent=0.9, body=False)
        z += thick
    return z


# ------------------------------------------------------------------------------------
# Thyroid nodules
# ------------------------------------------------------------------------------------

_COMPOSITION = ("cystic", "spongiform", "mixed", "solid")
_ECHO = ("anechoic", "hyperechoic", "isoechoic", "hypoechoic", "very_hypoechoic")
_MARGIN = ("smooth", "ill_defined", "lobulated", "irregular")
_FOCI = ("none", "comet_tail", "macrocalcification", "peripheral", "punctate")

_NODULE_PRIORS: dict[str, dict[str, tuple[float, ...]]] = {
    "benign": {
        "composition": (0.22, 0.18, 0.25, 0.35),
        "echogenicity": (0.0, 0.25, 0.45, 0.27, 0.03),
        "margin": (0.62, 0.2, 0.13, 0.05),
        "foci": (0.68, 0.14, 0.1, 0.03, 0.05),
        "taller": (0.08,),
    },
    "malignant": {
        "composition": (0.02, 0.02, 0.16, 0.8),
        "echogenicity": (0.0, 0.05, 0.2, 0.55, 0.2),
        "margin": (0.3, 0.22, 0.2, 0.28),
        "foci": (0.4, 0.02, 0.15, 0.08, 0.35),
        "taller": (0.42,),
    },
}

_POINTS = {
    "composition": {"cystic": 0, "spongiform": 0, "mixed": 1, "solid": 2},
    "echogenicity": {
        "anechoic": 0,
        "hyperechoic": 1,
        "isoechoic": 1,
        "hypoechoic": 2,
        "very_hypoechoic": 3,
    },
    "margin": {"smooth": 0, "ill_defined": 0, "lobulated": 2, "irregular": 2},
    "foci": {
        "none": 0,
        "comet_tail": 0,
        "macrocalcification": 1,
        "peripheral": 2,
        "punctate": 3,
    },
}


def sample_nodule_features(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw TI-RADS features of a benign or malignant nodule (overlapping distributions).

    Returns the features with ACR TI-RADS points and level for reference.
    """
    if kind not in _NODULE_PRIORS:
        raise ValueError(f"nodule kind must be 'benign' or 'malignant', got {kind!r}")
    pri = _NODULE_PRIORS[kind]
    comp = str(rng.choice(_COMPOSITION, p=pri["composition"]))
    if comp == "cystic":
        echo = "anechoic"
    elif comp == "spongiform":
        echo = "isoechoic" if rng.random() < 0.8 else "hyperechoic"
    else:
        echo = str(rng.choice(_ECHO, p=pri["echogenicity"]))
    margin = str(rng.choice(_MARGIN, p=pri["margin"]))
    foci = str(rng.choice(_FOCI, p=pri["foci"]))
    if comp == "cystic" and foci not in ("none", "comet_tail"):
        foci = "comet_tail"
    taller = bool(rng.random() < pri["taller"][0])
    ratio = float(rng.uniform(1.05, 1.6) if taller else rng.uniform(0.5, 0.97))
    size = float(np.clip(rng.lognormal(math.log(12.0), 0.35), 6.0, 28.0))
    points = (
        _POINTS["composition"][comp]
        + _POINTS["echogenicity"][echo]
        + (3 if taller else 0)
        + _POINTS["margin"][margin]
        + _POINTS["foci"][foci]
    )
    if points <= 1:
        level = "TR1"
    elif points == 2:
        level = "TR2"
    elif points == 3:
        level = "TR3"
    elif points <= 6:
        level = "TR4"
    else:
        level = "TR5"
    return {
        "composition": comp,
        "echogenicity": echo,
        "shape": "taller_than_wide" if taller else "wider_than_tall",
        "height_width_ratio": round(ratio, 3),
        "margin": margin,
        "echogenic_foci": foci,
        "size_mm": round(size, 1),
        "tirads_points": points,
        "tirads_level": level,
    }


def _nodule_painter(
    feat: dict[str, Any], cx: float, cz: float, freq: float, rng: np.random.Generator
) -> Callable[[Canvas], None]:
    """Pre-sample the nodule geometry and return a painter for it."""
    width = feat["size_mm"] / 2
    height = width * feat["height_width_ratio"]
    width = min(width, 14.0)
    height = min(height, 12.0)
    angle = float(rng.normal(0, 0.15))
    margin = feat["margin"]
    harm: tuple[tuple[int, float, float], ...] = tuple(
        (k, float(rng.uniform(0, 0.03)), float(rng.uniform(0, 6.3))) for k in (2, 3)
    )
    edge = 0.35
    if margin == "ill_defined":
        edge = float(rng.uniform(0.9, 1.6))
    elif margin == "lobulated":
        harm += tuple(
            (int(k), float(rng.uniform(0.07, 0.14)), float(rng.uniform(0, 6.3)))
            for k in rng.choice([3, 4, 5], size=2, replace=False)
        )
    elif margin == "irregular":
        harm += tuple(
            (int(k), float(rng.uniform(0.04, 0.08)), float(rng.uniform(0, 6.3)))
            for k in rng.choice(np.arange(7, 15), size=3, replace=False)
        )
    echo_factor = {
        "anechoic": 0.0,
        "hyperechoic": 2.2,
        "isoechoic": 1.0,
        "hypoechoic": 0.22,
        "very_hypoechoic": 0.05,
    }[feat["echogenicity"]] * float(rng.lognormal(0, 0.15))
    solid_echo = THYROID * echo_factor
    comp = feat["composition"]
    fluid = _fluid_atten(freq)
    halo = margin == "smooth" and rng.random() < 0.35
    cysts: list[tuple[float, float, float]] = []
    if comp == "spongiform":
        n = int(rng.integers(12, 30))
        for _ in range(n):
            a, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.8))
            cysts.append(
                (rr * width * math.cos(a), rr * height * math.sin(a), float(rng.uniform(0.5, 1.3)))
            )
    mixed_part = None
    if comp == "mixed":
        a = rng.uniform(0, 2 * math.pi)
        frac = rng.uniform(0.35, 0.65)
        mixed_part = (0.4 * width * math.cos(a), 0.4 * height * math.sin(a), frac)
    foci = feat["echogenic_foci"]
    dots: list[tuple[float, float, float]] = []
    if foci == "punctate":
        for _ in range(int(rng.integers(3, 13))):
            a, rr = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.75))
            dots.append(
                (
                    rr * width * math.cos(a),
                    rr * height * math.sin(a),
                    float(rng.uniform(0.25, 0.45)),
                )
            )
    elif foci == "comet_tail":
        for _ in range(int(rng.integers(1, 4))):
            dots.append((rng.uniform(-0.5, 0.5) * width, rng.uniform(-0.6, 0.2) * height, 0.35))
    macro = (rng.uniform(-0.4, 0.4) * width, rng.uniform(-0.4, 0.2) * height, rng.uniform(1.2, 2.8))
    tex_seed = int(rng.integers(2**31))

    def paint(c: Canvas) -> None:
        trng = np.random.default_rng(tex_seed)
        if halo:
            c.ellipse(
                cx, cz, width + 0.8, height + 0.8, angle=angle, echo=0.15, edge=0.3, harmonics=harm
            )
        if comp == "cystic":
            c.ellipse(
                cx,
                cz,
                width,
                height,
                angle=angle,
                echo=BLOOD * 3,
                atten=fluid,
                edge=edge,
                harmonics=harm,
            )
            c.ellipse(
                cx,
                cz,
                width,
                height,
                angle=angle,
                coherent=0.5,
                edge=0.3,
                hollow=0.5,
                harmonics=harm,
            )
        else:
            hetero = c.smooth_texture(trng, 3.0 if comp == "solid" else 2.0, cells=24)
            c.ellipse(
                cx,
                cz,
                width,
                height,
                angle=angle,
                echo=max(solid_echo, BLOOD * 4),
                atten=0.05 * freq * (1 - echo_factor),
                edge=edge,
                harmonics=harm,
                texture=hetero,
            )
        for ux, uz, r in cysts:
            c.ellipse(cx + ux, cz + uz, r, r * 0.8, echo=BLOOD * 5, atten=fluid * 0.5, edge=0.2)
        if mixed_part is not None:
            ux, uz, frac = mixed_part
            c.ellipse(
                cx + ux,
                cz + uz,
                width * frac,
                height * frac,
                angle=angle,
                echo=BLOOD * 3,
                atten=fluid,
                edge=0.4,
                harmonics=harm,
            )
        for ux, uz, r in dots:
            c.ellipse(cx + ux, cz + uz, r, r, echo=25.0, coherent=2.0, edge=0.2)
            if foci == "comet_tail":
                x_p, z_p = c._to_probe(np.array([cx + ux]), np.array([cz + uz]))
                c.beam_streak(
                    float(x_p[0]),
                    float(z_p[0]) + r,
                    0.8,
                    12.0,
                    decay_mm=1.5,
                    z_to=float(z_p[0]) + 6,
                )
        if foci == "macrocalcification":
            mx, mz, mr = macro
            c.ellipse(cx + mx, cz + mz, mr, mr * 0.7, echo=30.0, coherent=2.5, atten=6.0, edge=0.3)
        elif foci == "peripheral":
            c.ellipse(
                cx,
                cz,
                width,
                height,
                angle=angle,
                echo=30.0,
                coherent=2.0,
                atten=5.0,
                edge=0.3,
                hollow=0.8,
                harmonics=harm,
            )

    return paint


# ------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------


def _drift(
    rng: np.random.Generator, amp_x: float, amp_z: float
) -> tuple[float, float, float, float]:
    return (
        float(rng.uniform(0.03, 0.12)),
        float(rng.uniform(0, 2 * math.pi)),
        amp_x,
        amp_z,
    )


def _abdomen(style: VendorStyle, rng: np.random.Generator) -> Anatomy:
    depth = float(rng.uniform(140, 190))
    freq = float(rng.uniform(3.0, 5.0))
    geo = BeamGeometry(
        ProbeKind.CURVILINEAR,
        depth,
        angle_rad=math.radians(style.curvilinear_angle_deg),
        radius_mm=style.curvilinear_radius_mm,
    )
    wall = [
        (float(rng.uniform(1, 3)), 1.2),
        (float(rng.uniform(6, 20)), FAT),
        (float(rng.uniform(8, 15)), MUSCLE),
    ]
    fl = _fluid_atten(freq)
    # Kidney
    kx, kz = float(rng.uniform(-25, 30)), float(rng.uniform(0.55, 0.72) * depth)
    ka, kb, kang = float(rng.uniform(42, 55)), float(rng.uniform(20, 27)), float(rng.normal(0, 0.3))
    pyramids = [
        (float(a), float(rng.uniform(0.6, 0.72)))
        for a in np.linspace(0.3, 5.9, 7) + rng.normal(0, 0.15, 7)
    ]
    sinus_h = tuple(
        (int(k), float(rng.uniform(0.05, 0.12)), float(rng.uniform(0, 6.3))) for k in (3, 5)
    )
    # Diaphragm dome
    dd = float(rng.uniform(0.72, 0.95) * depth)
    dx0 = float(rng.uniform(-40, 40))
    curv = float(rng.uniform(0.004, 0.012))
    # Vessels
    vessels = []
    for _ in range(int(rng.integers(3, 8))):
        vessels.append(
            (
                float(rng.uniform(-60, 60)),
                float(rng.uniform(0.2, 0.6) * depth),
                float(rng.uniform(2.5, 9.0)),
                float(rng.uniform(0.5, 1.0)),
                float(rng.uniform(0, math.pi)),
                bool(rng.random() < 0.5),
            )
        )
    gb = None
    if rng.random() < 0.35:
        gb = (
            float(rng.uniform(-50, 10)),
            float(rng.uniform(0.3, 0.45) * depth),
            float(rng.uniform(18, 35)),
            float(rng.uniform(9, 15)),
            float(rng.normal(0, 0.4)),
        )
    tex_seed = int(rng.integers(2**31))
    breath_period = float(rng.uniform(3.5, 5.5))
    drift = _drift(rng, 3.0, 1.0)
    tilt = float(rng.normal(0, 0.08))

    def pose(t: float) -> BodyPose:
        b = 6.0 * math.sin(2 * math.pi * t / breath_period)
        f, ph, ax, az = drift
        return BodyPose(
            dx=ax * math.sin(2 * math.pi * f * t + ph) + 0.4 * b,
            dz=b + az * math.sin(2 * math.pi * f * t),
            angle=tilt,
            cz=depth / 2,
        )

    def paint(c: Canvas, t: float) -> None:
        trng = np.random.default_rng(tex_seed)
        liver_tex = c.smooth_texture(trng, 1.5, cells=12)
        c.echo *= liver_tex
        # Below the diaphragm: mirror-image liver, slightly darker.
        xs = np.linspace(-150, 150, 31)
        zs = dd - curv * (xs - dx0) ** 2
        c.polyline_band(xs, zs, 3.0, echo=6.0, coherent=2.5, below=0.0)
        c.polyline_band(xs, zs + 1.5, 0.0, echo=0.55, below=150.0, edge=0.8)
        if gb is not None:
            gx, gz, ga, gbz, gang = gb
            c.ellipse(gx, gz, ga, gbz, angle=gang, coherent=1.2, hollow=1.0, edge=0.4)
            c.ellipse(gx, gz, ga - 1, gbz - 1, angle=gang, echo=BLOOD, atten=fl, edge=0.4)
        for vx, vz, vr, asp, vang, portal in vessels:
            if portal:
                c.ellipse(
                    vx,
                    vz,
                    vr + 1.0,
                    vr * asp + 1.0,
                    angle=vang,
                    echo=5.0,
                    coherent=0.8,
                    edge=0.4,
                    hollow=1.2,
                )
            c.ellipse(vx, vz, vr, vr * asp, angle=vang, echo=BLOOD, atten=fl, edge=0.5)
        # Kidney: perirenal fat, capsule, cortex, pyramids, sinus.
        c.ellipse(kx, kz, ka + 4, kb + 4, angle=kang, echo=2.2, edge=1.5)
        c.ellipse(kx, kz, ka, kb, angle=kang, coherent=1.2, hollow=0.7, edge=0.3)
        c.ellipse(kx, kz, ka - 0.7, kb - 0.7, angle=kang, echo=0.5, edge=0.5)
        ca, sa = math.cos(kang), math.sin(kang)
        for a, rr in pyramids:
            u, v = rr * ka * math.cos(a), rr * kb * math.sin(a)
            px, pz = kx + u * ca - v * sa, kz + u * sa + v * ca
            c.ellipse(px, pz, 5.0, 3.5, angle=kang + a, echo=0.08, edge=0.8)
        c.ellipse(kx, kz, 0.55 * ka, 0.38 * kb, angle=kang, echo=3.5, edge=1.5, harmonics=sinus_h)
        _skin_and_wall(c, wall, liver_tex)

    return Anatomy(
        view=View.ABDOMEN.value,
        geometry=geo,
        frequency_mhz=freq,
        focus_mm=float(rng.uniform(0.45, 0.65) * depth),
        background=1.0,
        paint=paint,
        pose=pose,
        labels={"nodule": None, "lung_pattern": None},
        calipers=[
            (
                (kx - ka * math.cos(kang), kz - ka * math.sin(kang)),
                (kx + ka * math.cos(kang), kz + ka * math.sin(kang)),
            )
        ],
        decorrelation=0.2,
    )


def _thyroid(
    style: VendorStyle, rng: np.random.Generator, transverse: bool, nodule: str
) -> Anatomy:
    depth = float(rng.uniform(35, 50))
    freq = float(rng.uniform(8.0, 13.0))
    width = style.linear_width_mm * (1.3 if transverse else 1.0)
    geo = BeamGeometry(ProbeKind.LINEAR, depth, width_mm=width)
    fl = _fluid_atten(freq)
    wall = [(float(rng.uniform(0.8, 1.5)), 1.0), (float(rng.uniform(1.5, 4.0)), FAT)]
    z_wall = 0.6 + sum(t for t, _ in wall)
    tex_seed = int(rng.integers(2**31))
    pulse = float(rng.uniform(55, 95)) / 60.0
    drift = _drift(rng, 1.5, 0.5)
    tilt = float(rng.normal(0, 0.05))
    calipers: list[tuple[tuple[float, float], tuple[float, float]]] = []
    lobes: list[tuple[float, float, float, float, float]] = []
    if transverse:
        trx = float(rng.normal(0, 2.0))
        tr_r = float(rng.uniform(7.5, 10.0))
        tr_top = z_wall + float(rng.uniform(7, 11))
        for side in (-1, 1):
            lobes.append(
                (
                    trx + side * (tr_r + float(rng.uniform(4, 7))),
                    tr_top + float(rng.uniform(2, 5)),
                    float(rng.uniform(7, 10)),
                    float(rng.uniform(6.5, 9.5)),
                    side * float(rng.uniform(0.05, 0.35)),
                )
            )
        carotids = []
        jugulars = []
        for (lx, lz, la, lb, _), side in zip(lobes, (-1, 1), strict=True):
            cr = float(rng.uniform(2.8, 3.8))
            cx = lx + side * (la + cr + float(rng.uniform(0.5, 2.0)))
            cz = lz + lb * float(rng.uniform(0.1, 0.5))
            carotids.append((cx, cz, cr))
            ja, jb = float(rng.uniform(3, 6)), float(rng.uniform(1.2, 3.5))
            jugulars.append((cx + side * (cr + ja * 0.7), cz - cr - jb * 0.3, ja, jb))
        eso_side = 1
        vert_z = tr_top + 2 * tr_r + float(rng.uniform(5, 9))
    else:
        lx = float(rng.normal(0, 3))
        lz = z_wall + float(rng.uniform(8, 11))
        lobes.append(
            (
                lx,
                lz,
                float(rng.uniform(18, 27)),
                float(rng.uniform(6, 9)),
                float(rng.normal(0, 0.08)),
            )
        )
        cca = rng.random() < 0.3
        cca_z = lz + lobes[0][3] + float(rng.uniform(3, 6))
    lobe_idx = int(rng.integers(len(lobes)))
    nod_paint = None
    feats: dict[str, Any] = {}
    if nodule != NoduleClass.NONE.value:
        feats = sample_nodule_features(nodule, rng)
        lx, lz, la, lb, lang = lobes[lobe_idx]
        half = feats["size_mm"] / 2
        # Big nodules swell the lobe, as they do in real glands.
        grow = max(1.0, (half * max(1.0, feats["height_width_ratio"]) + 3.0) / lb)
        lobes[lobe_idx] = (lx, lz + 0.4 * (grow - 1) * lb, max(la, half + 4.0), lb * grow, lang)
        lx, lz, la, lb, lang = lobes[lobe_idx]
        nx = lx + float(rng.uniform(-0.4, 0.4)) * max(la - half, 0.0)
        nz = lz + float(rng.uniform(-0.25, 0.25)) * max(lb - half, 0.0)
        nod_paint = _nodule_painter(feats, nx, nz, freq, rng)
        calipers.append(((nx - min(half, 14.0), nz), (nx + min(half, 14.0), nz)))
        feats["center_mm"] = (round(nx, 2), round(nz, 2))
        feats["lobe"] = ("right" if lobe_idx == 0 else "left") if transverse else "imaged"
    else:
        lx, lz, la, lb, _ = lobes[lobe_idx]
        calipers.append(((lx, lz - lb), (lx, lz + lb)))
    lobe_h = [
        tuple((int(k), float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 6.3))) for k in (2, 3))
        for _ in lobes
    ]

    def pose(t: float) -> BodyPose:
        f, ph, ax, az = drift
        return BodyPose(
            dx=ax * math.sin(2 * math.pi * f * t + ph),
            dz=az * math.sin(2 * math.pi * f * t),
            angle=tilt,
            cz=depth / 2,
        )

    def paint(c: Canvas, t: float) -> None:
        trng = np.random.default_rng(tex_seed)
        tex = c.smooth_texture(trng, 1.5, cells=10)
        thy_tex = c.smooth_texture(trng, 1.2, cells=20)
        c.echo[:] = 0.3 * tex  # deep neck soft tissue
        pul = 1.0 + 0.08 * max(0.0, math.sin(2 * math.pi * pulse * t)) ** 3
        if transverse:
            # Longus colli, vertebral body with shadow
            for side in (-1, 1):
                c.ellipse(trx + side * 9, vert_z - 5, 7, 4, echo=MUSCLE, edge=0.8)
            c.ellipse(trx, vert_z + 8, 14, 8, echo=0.05, atten=BONE_ATTEN, edge=0.4)
            c.ellipse(trx, vert_z + 8, 14, 8, coherent=1.2, hollow=0.6, edge=0.3)
            c.ellipse(trx + 9 * eso_side, tr_top + tr_r + 3, 4.5, 3.0, echo=0.3, edge=0.5)
            c.ellipse(trx + 9 * eso_side, tr_top + tr_r + 3, 2.0, 0.8, echo=3.0, edge=0.4)
            for i, (lx_, lz_, la_, lb_, lang_) in enumerate(lobes):
                c.ellipse(
                    lx_,
                    lz_,
                    la_ + 0.4,
                    lb_ + 0.4,
                    angle=lang_,
                    coherent=0.5,
                    hollow=0.5,
                    harmonics=lobe_h[i],
                )
                c.ellipse(
                    lx_,
                    lz_,
                    la_,
                    lb_,
                    angle=lang_,
                    echo=THYROID,
                    edge=0.5,
                    harmonics=lobe_h[i],
                    texture=thy_tex,
                )
            for cx, cz, r in carotids:
                r = r * pul
                c.ellipse(cx, cz, r + 0.5, r + 0.5, coherent=1.2, echo=4.0, edge=0.3, hollow=0.6)
                c.ellipse(cx, cz, r, r, echo=BLOOD, atten=fl, edge=0.3)
            for jx, jz, ja, jb in jugulars:
                c.ellipse(jx, jz, ja, jb, echo=BLOOD, atten=fl, edge=0.4)
            c.ellipse(trx, tr_top - 2.0, tr_r + 6, 3.0, echo=THYROID, edge=0.6, texture=thy_tex)
            # Trachea: cartilage ring, bright air interface, air column with shadow.
            c.ellipse(trx, tr_top + tr_r, tr_r, tr_r, echo=0.06, hollow=1.8, edge=0.4)
            c.ellipse(
                trx, tr_top + tr_r, tr_r - 1.8, tr_r - 1.8, echo=BLOOD, atten=AIR_ATTEN, edge=0.3
            )
            c.ellipse(
                trx,
                tr_top + tr_r,
                tr_r - 1.8,
                tr_r - 1.8,
                coherent=3.0,
                echo=30.0,
                hollow=0.6,
                edge=0.3,
                atten=AIR_ATTEN,
            )
            x_p, z_p = c._to_probe(np.array([trx]), np.array([tr_top]))
            for k in range(1, 4):
                c.beam_streak(
                    float(x_p[0]),
                    float(z_p[0]) + 1.8 + k * (tr_top + 1.8) * 0.5,
                    tr_r * 0.9,
                    2.0 * 0.45**k,
                    z_to=float(z_p[0]) + 2.8 + k * (tr_top + 1.8) * 0.5,
                )
            # Strap muscles and sternocleidomastoid.
            for (lx_, lz_, la_, lb_, _), side in zip(lobes, (-1, 1), strict=True):
                c.ellipse(
                    lx_ - side * 1,
                    lz_ - lb_ - 2.0,
                    la_ * 0.9,
                    2.0,
                    echo=MUSCLE,
                    edge=0.5,
                    angle=side * 0.15,
                )
                c.ellipse(
                    lx_ + side * 9, lz_ - lb_ - 1, 10, 3.5, echo=MUSCLE, edge=0.6, angle=-side * 0.3
                )
        else:
            lx_, lz_, la_, lb_, lang_ = lobes[0]
            c.ellipse(lx_, lz_ + lb_ + 6, 60, 3.5, echo=MUSCLE, edge=0.8)
            c.polyline_band(
                np.array([-80.0, 80.0]),
                np.array([lz_ + lb_ + 9.5] * 2),
                0.6,
                coherent=1.0,
                echo=3.0,
            )
            if cca:
                c.polyline_band(
                    np.array([-80.0, 80.0]),
                    np.array([cca_z, cca_z + 1]),
                    6.0 * pul,
                    echo=BLOOD,
                    atten=fl,
                )
                for off in (-3.0, 3.0):
                    c.polyline_band(
                        np.array([-80.0, 80.0]),
                        np.array([cca_z + off * pul, cca_z + 1 + off * pul]),
                        0.5,
                        coherent=1.0,
                    )
            c.ellipse(
                lx_,
                lz_,
                la_ + 0.4,
                lb_ + 0.4,
                angle=lang_,
                coherent=0.5,
                hollow=0.5,
                harmonics=lobe_h[0],
            )
            c.ellipse(
                lx_,
                lz_,
                la_,
                lb_,
                angle=lang_,
                echo=THYROID,
                edge=0.5,
                harmonics=lobe_h[0],
                texture=thy_tex,
            )
            for k in range(2):
                c.ellipse(lx_ + (-0.8 + 1.6 * k) * la_, lz_ + 1.5, 1.2, 0.8, echo=BLOOD, atten=fl)
            c.ellipse(lx_, lz_ - lb_ - 2.5, la_ * 1.3, 2.2, echo=MUSCLE, edge=0.5, angle=lang_)
        if nod_paint is not None:
            nod_paint(c)
        _skin_and_wall(c, wall, tex)

    return Anatomy(
        view=View.THYROID_TRANSVERSE.value if transverse else View.THYROID_LONGITUDINAL.value,
        geometry=geo,
        frequency_mhz=freq,
        focus_mm=float(rng.uniform(0.35, 0.6) * depth),
        background=0.45,
        paint=paint,
        pose=pose,
        labels={"nodule": nodule, "lung_pattern": None},
        findings=feats,
        calipers=calipers,
        decorrelation=0.1,
    )


def _cardiac(style: VendorStyle, rng: np.random.Generator) -> Anatomy:
    depth = float(rng.uniform(140, 180))
    freq = float(rng.uniform(2.0, 3.5))
    geo = BeamGeometry(
        ProbeKind.PHASED, depth, angle_rad=math.radians(style.phased_angle_deg), radius_mm=1.5
    )
    fl = _fluid_atten(freq)
    ax0, az0 = float(rng.normal(0, 6)), float(rng.uniform(14, 26))
    phi = float(rng.normal(0, 0.12))
    length = float(rng.uniform(0.66, 0.78) * depth)
    width = float(rng.uniform(0.52, 0.62) * depth)
    hr = float(rng.uniform(55, 105)) / 60.0
    t0 = float(rng.uniform(0, 1))
    wall = [(float(rng.uniform(4, 8)), 0.5), (float(rng.uniform(5, 10)), MUSCLE)]
    jit = rng.normal(1.0, 0.06, 8)
    drift = _drift(rng, 2.5, 1.5)
    tex_seed = int(rng.integers(2**31))
    d = (math.sin(phi), math.cos(phi))
    n = (math.cos(phi), -math.sin(phi))

    def at(u: float, v: float) -> tuple[float, float]:
        return ax0 + u * length * d[0] + v * width * n[0], az0 + u * length * d[1] + v * width * n[
            1
        ]

    def phase(t: float) -> tuple[float, float]:
        p = (t * hr + t0) % 1.0
        systole = math.sin(math.pi * p / 0.38) ** 2 if p < 0.38 else 0.0
        atrial = math.sin(math.pi * (p - 0.8) / 0.2) ** 2 if p > 0.8 else 0.0
        return systole, atrial

    def pose(t: float) -> BodyPose:
        f, ph, axd, azd = drift
        return BodyPose(
            dx=axd * math.sin(2 * math.pi * f * t + ph),
            dz=azd * math.sin(2 * math.pi * 0.25 * t),
            angle=0.0,
            cz=depth / 2,
        )

    def leaflet(c: Canvas, hinge_v: float, toward: float, open_: float, length_mm: float) -> None:
        hx, hz = at(0.62, hinge_v)
        # Closed: across the annulus; open: swung towards the apex.
        vx = (1 - open_) * toward * n[0] - open_ * d[0]
        vz = (1 - open_) * toward * n[1] - open_ * d[1]
        ang = math.atan2(vz, vx)
        cx = hx + 0.5 * length_mm * math.cos(ang)
        cz = hz + 0.5 * length_mm * math.sin(ang)
        c.ellipse(cx, cz, length_mm / 2, 0.9, angle=ang, echo=8.0, coherent=1.0, edge=0.4)

    def paint(c: Canvas, t: float) -> None:
        trng = np.random.default_rng(tex_seed)
        tex = c.smooth_texture(trng, 2.5, cells=14)
        c.echo[:] = 0.05 * tex
        sysf, atr = phase(t)
        sv = 1.0 - 0.2 * sysf
        sa = 1.0 + 0.12 * sysf - 0.15 * atr
        hx, hz = at(0.5, 0.0)
        c.ellipse(
            hx,
            hz,
            0.53 * length,
            0.5 * width,
            angle=phi + math.pi / 2,
            echo=3.0,
            coherent=1.0,
            edge=1.0,
            hollow=3.0,
        )
        c.ellipse(
            hx,
            hz,
            0.51 * length,
            0.48 * width,
            angle=phi + math.pi / 2,
            echo=MYOCARDIUM,
            edge=1.0,
            texture=tex,
        )
        ox, oz = at(1.0, 0.28)
        c.ellipse(ox, oz, 10, 10, echo=BLOOD, atten=fl, edge=0.4)
        chambers = [
            (0.36 + 0.05 * (1 - sv), 0.19, 0.29 * sv * jit[0], 0.135 * sv * jit[1]),
            (0.42 + 0.04 * (1 - sv), -0.2, 0.24 * sv * jit[2], 0.12 * sv * jit[3]),
            (0.8, 0.17, 0.14 * sa * jit[4], 0.14 * sa * jit[5]),
            (0.8, -0.18, 0.13 * sa * jit[6], 0.13 * sa * jit[7]),
        ]
        for u, v, lu, lv in chambers:
            cx, cz = at(u, v)
            c.ellipse(
                cx,
                cz,
                lu * length,
                lv * width,
                angle=phi + math.pi / 2,
                echo=BLOOD,
                atten=fl,
                edge=1.0,
            )
            c.ellipse(
                cx,
                cz,
                lu * length + 0.8,
                lv * width + 0.8,
                angle=phi + math.pi / 2,
                coherent=0.35,
                hollow=0.8,
                edge=0.5,
            )
        # Atrioventricular valves: closed across the annulus in systole, open in diastole.
        open_ = 1.0 - min(1.0, sysf * 3)
        for v0, v1 in ((0.07, 0.31), (-0.07, -0.31)):
            lm = 0.115 * width
            sign = 1.0 if v1 > v0 else -1.0
            leaflet(c, v0, sign, open_, lm)
            leaflet(c, v1, -sign, open_, lm)
        _skin_and_wall(c, wall, tex)

    return Anatomy(
        view=View.CARDIAC_4CH.value,
        geometry=geo,
        frequency_mhz=freq,
        focus_mm=float(rng.uniform(0.5, 0.7) * depth),
        background=0.05,
        paint=paint,
        pose=pose,
        labels={"nodule": None, "lung_pattern": None},
        calipers=[(at(0.62, 0.07), at(0.62, 0.31))],
        decorrelation=0.45,
    )


def _lung(style: VendorStyle, rng: np.random.Generator, pattern: str) -> Anatomy:
    convex = rng.random() < 0.6
    if convex:
        depth, freq = float(rng.uniform(80, 140)), float(rng.uniform(3.0, 5.0))
        geo = BeamGeometry(
            ProbeKind.CURVILINEAR,
            depth,
            angle_rad=math.radians(style.curvilinear_angle_deg),
            radius_mm=style.curvilinear_radius_mm,
        )
        wall = [
            (float(rng.uniform(1, 2)), 1.0),
            (float(rng.uniform(4, 10)), FAT),
            (float(rng.uniform(5, 10)), MUSCLE),
        ]
        spacing = float(rng.uniform(55, 80))
    else:
        depth, freq = float(rng.uniform(40, 70)), float(rng.uniform(7.0, 11.0))
        geo = BeamGeometry(ProbeKind.LINEAR, depth, width_mm=style.linear_width_mm)
        wall = [
            (float(rng.uniform(1, 2)), 1.0),
            (float(rng.uniform(3, 7)), FAT),
            (float(rng.uniform(3, 7)), MUSCLE),
        ]
        spacing = float(rng.uniform(34, 48))
    z_wall = 0.6 + sum(t for t, _ in wall)
    rib_z = z_wall - float(rng.uniform(0.5, 2.0))
    rib_x = float(rng.normal(0, 3))
    pleura_z = rib_z + float(rng.uniform(4.0, 7.0))
    rib_a, rib_b = float(rng.uniform(5, 7)), float(rng.uniform(3, 4.5))
    breath = float(rng.uniform(3.5, 5.0))
    sliding = float(rng.uniform(0.5, 1.5))
    tex_seed = int(rng.integers(2**31))
    fl = _fluid_atten(freq)
    n_b = 0
    if pattern == LungPattern.B_LINES.value:
        n_b = int(rng.integers(3, 7))
    elif pattern == LungPattern.NORMAL.value and rng.random() < 0.25:
        n_b = 1
    half_gap = spacing / 2 - rib_a
    blines = [
        (
            float(rng.uniform(-0.9, 0.9) * half_gap),
            float(rng.uniform(1.5, 3.5)),
            float(rng.uniform(0.6, 1.0) if pattern == "b_lines" else rng.uniform(0.05, 0.15)),
        )
        for _ in range(n_b)
    ]
    consol = None
    findings: dict[str, Any] = {}
    if pattern == LungPattern.CONSOLIDATION.value:
        cw = float(rng.uniform(0.45, 0.9) * half_gap)
        cd = float(rng.uniform(15, min(55.0, 0.6 * depth)))
        cx = float(rng.uniform(-0.3, 0.3) * half_gap)
        harm = tuple(
            (int(k), float(rng.uniform(0.04, 0.1)), float(rng.uniform(0, 6.3)))
            for k in rng.choice(np.arange(5, 14), size=3, replace=False)
        )
        bronchi = []
        for _ in range(int(rng.integers(4, 14))):
            bronchi.append(
                (
                    cx + float(rng.uniform(-0.7, 0.7) * cw),
                    pleura_z + float(rng.uniform(0.2, 0.85) * cd),
                    float(rng.uniform(1.0, 5.0)),
                    float(rng.uniform(0, math.pi)),
                )
            )
        effusion = rng.random() < 0.25
        rng_shred = rng.uniform(-0.8, 0.8, int(rng.integers(1, 4)))
        consol = (cx, cw, cd, harm, bronchi, effusion)
        findings = {"consolidation_depth_mm": round(cd, 1), "effusion": effusion}
    findings["b_line_count"] = n_b
    a_gain = 0.35 if pattern != LungPattern.NORMAL.value else 1.0

    def pose(t: float) -> BodyPose:
        return BodyPose(
            dx=0.6 * math.sin(2 * math.pi * t / breath), dz=0.0, angle=0.0, cz=depth / 2
        )

    def paint(c: Canvas, t: float) -> None:
        trng = np.random.default_rng(tex_seed)
        tex = c.smooth_texture(trng, 1.5, cells=12)
        slide = sliding * math.sin(2 * math.pi * t / breath)
        # Aerated lung below the pleura: total reflection, nothing beyond but artefacts.
        c.layer(pleura_z + 0.5, depth + 50, echo=0.01, atten=AIR_ATTEN, edge=0.3, body=False)
        if consol is not None:
            cx, cw, cd, harm, bronchi, effusion = consol
            cz = pleura_z + 0.5 * cd
            if effusion:
                c.ellipse(
                    cx + slide, cz, cw + 4, 0.5 * cd + 3, echo=BLOOD, atten=fl, edge=0.5, body=False
                )
            c.ellipse(
                cx + slide,
                cz - 1.5,
                cw,
                0.5 * cd + 1.5,
                echo=0.9,
                atten=0.05,
                edge=1.0,
                harmonics=harm,
                body=False,
                texture=tex,
            )
            for bx, bz, bl, ba in bronchi:
                c.ellipse(bx + slide, bz, bl, 0.35, angle=ba, echo=10.0, edge=0.3, body=False)
        # Chest wall over the pleura.
        c.layer(z_wall - 1, pleura_z - 0.4, echo=MUSCLE * 1.2, edge=0.5, texture=tex)
        c.polyline_band(
            np.array([-200.0, 200.0]),
            np.array([pleura_z, pleura_z]),
            1.0 if pattern == "normal" else 1.8,
            coherent=2.0,
            echo=12.0,
            body=False,
        )
        for k in (-2, -1, 0, 1):
            x = rib_x + (k + 0.5) * spacing
            c.ellipse(
                x, rib_z + rib_b, rib_a, rib_b, echo=0.1, atten=BONE_ATTEN, edge=0.3, body=False
            )
            c.ellipse(
                x,
                rib_z + rib_b,
                rib_a,
                rib_b,
                echo=25.0,
                coherent=2.5,
                hollow=0.8,
                edge=0.3,
                body=False,
                atten=BONE_ATTEN,
            )
        # Transmission down to the pleura decides where reverberations appear.
        grid = c.grid
        ip = min(int(pleura_z / grid.dr), grid.n_r - 1)
        cum = np.cumsum(c.atten[:ip], axis=0)[-1] * grid.dr if ip > 0 else np.zeros(grid.n_lines)
        trans = np.power(10.0, -np.minimum(cum, 60) / 10.0).astype(np.float32)
        r = grid.r_axis
        if consol is None:
            a_lines = np.zeros(grid.n_r, dtype=np.float32)
            for k in range(2, 8):
                a_lines += (a_gain * 6.0 * 0.6**k) * np.exp(
                    -0.5 * ((r - k * pleura_z) / 0.7) ** 2
                ).astype(np.float32)
            shimmer = 0.03 * np.exp(-(r - pleura_z) / 8.0) * (r > pleura_z)
            c.artifact += (a_lines + shimmer.astype(np.float32))[:, None] * trans[None, :]
        else:
            _xg, _zg = grid.physical()
            cx, cw, cd, *_ = consol
            # Shred sign: the irregular deep border throws short comet tails.
            for sx in cx + slide + cw * rng_shred:
                c.beam_streak(float(sx), pleura_z + cd * 0.9, 1.2, 0.12, decay_mm=8.0)
        for bx, bw, bi in blines:
            c.beam_streak(bx + slide, pleura_z, bw, 3.5 * bi)
        _skin_and_wall(c, wall[:-1], tex)

    return Anatomy(
        view=View.LUNG.value,
        geometry=geo,
        frequency_mhz=freq,
        focus_mm=float(pleura_z + rng.uniform(5, 25)),
        background=0.3,
        paint=paint,
        pose=pose,
        labels={"nodule": None, "lung_pattern": pattern},
        findings=findings,
        calipers=[
            ((rib_x - 0.5 * spacing + rib_a, pleura_z), (rib_x + 0.5 * spacing - rib_a, pleura_z))
        ],
        decorrelation=0.2,
    )


def sample_anatomy(
    view: str,
    *,
    style: VendorStyle,
    rng: np.random.Generator,
    nodule: str | None = None,
    lung_pattern: str | None = None,
) -> Anatomy:
    """Draw the random anatomy of ``view``.

    Parameters
    ----------
    view
        One of :data:`VIEWS`.
    style
        Vendor style (sets sector angles and linear aperture).
    rng
        Random generator.
    nodule
        ``none``, ``benign`` or ``malignant`` for thyroid views; ``None`` draws one.
    lung_pattern
        ``normal``, ``b_lines`` or ``consolidation`` for the lung view; ``None`` draws one.

    Raises
    ------
    ValueError
        For an unknown view or a label that does not apply to the view.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if nodule is not None:
        if view not in THYROID_VIEWS:
            raise ValueError(f"nodule applies to thyroid views only, not {view!r}")
        if nodule not in {n.value for n in NoduleClass}:
            raise ValueError(
                f"nodule must be one of {[n.value for n in NoduleClass]}, got {nodule!r}"
            )
    if lung_pattern is not None:
        if view != View.LUNG.value:
            raise ValueError(f"lung_pattern applies to the lung view only, not {view!r}")
        if lung_pattern not in {p.value for p in LungPattern}:
            raise ValueError(
                f"lung_pattern must be one of {[p.value for p in LungPattern]}, "
                f"got {lung_pattern!r}"
            )
    if view == View.ABDOMEN.value:
        return _abdomen(style, rng)
    if view in THYROID_VIEWS:
        if nodule is None:
            nodule = str(rng.choice([n.value for n in NoduleClass], p=[0.4, 0.35, 0.25]))
        return _thyroid(style, rng, view == View.THYROID_TRANSVERSE.value, nodule)
    if view == View.CARDIAC_4CH.value:
        return _cardiac(style, rng)
    if lung_pattern is None:
        lung_pattern = str(rng.choice([p.value for p in LungPattern], p=[0.4, 0.3, 0.3]))
    return _lung(style, rng, lung_pattern)
