"""Frame and cine-loop simulation: anatomy + vendor style + image quality -> :class:`SimFrame`."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from simulator.bmode import (
    Acquisition,
    BeamGrid,
    Canvas,
    fit_layout,
    form_beam_image,
    scan_converter,
    smooth_field,
)
from simulator.overlays import OverlayInfo, caliper_length_mm, draw_overlays
from simulator.vendors import ProbeKind, VendorStyle, get_vendor, grey_map
from simulator.views import Anatomy, View, sample_anatomy

logger = logging.getLogger(__name__)

_PROBE_LABEL = {ProbeKind.CURVILINEAR: "C5-1", ProbeKind.LINEAR: "L12-4", ProbeKind.PHASED: "P4-2"}
_PRESET = {
    View.ABDOMEN.value: "ABD",
    View.THYROID_TRANSVERSE.value: "THY",
    View.THYROID_LONGITUDINAL.value: "THY",
    View.CARDIAC_4CH.value: "CARD",
    View.LUNG.value: "LUNG",
}
_DEGRADATIONS = ("low_gain", "haze", "motion_blur", "poor_contact", "off_axis")


@dataclass(frozen=True)
class SimFrame:
    """One simulated frame with its ground truth.

    Attributes
    ----------
    pixels
        ``(rows, cols)`` ``uint8`` grey, or ``(rows, cols, 3)`` ``uint8`` RGB for tinted vendors.
    scan_mask
        ``bool (rows, cols)``: pixels inside the ultrasound sector / rectangle.
    scan_bbox
        ``(column0, row0, column1, row1)`` of the mask, exclusive end.
    labels
        ``view``, ``nodule``, ``lung_pattern``, ``quality`` and ``vendor``.
    findings
        Detail of the ground truth (TI-RADS features, degradations, B-line count...).
    spacing_mm
        Pixel spacing of the scan region (square pixels), mm.
    acquisition
        Probe and system parameters used (``probe``, ``depth_mm``, ``frequency_mhz``,
        ``reference_pixel`` (col, row of depth 0 on the centre line), ``time_s``...).
    """

    pixels: np.ndarray
    scan_mask: np.ndarray
    scan_bbox: tuple[int, int, int, int]
    labels: dict[str, str | float | None]
    findings: Mapping[str, Any] = field(default_factory=dict)
    spacing_mm: float = 0.0
    acquisition: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _QualityPlan:
    quality: float
    gain_db: float
    haze: float
    noise_deep_db: float
    motion_blur: float
    dropout: tuple[float, float, float] | None
    off_axis: float
    degradations: tuple[str, ...]


def _quality_plan(quality: float | None, rng: np.random.Generator) -> _QualityPlan:
    if quality is None:
        quality = (
            float(rng.uniform(0.8, 1.0)) if rng.random() < 0.8 else float(rng.uniform(0.1, 0.8))
        )
    elif not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    gain, haze, noise, blur, off = float(rng.normal(0, 1.5)), 0.0, -32.0, 0.0, 0.0
    dropout = None
    chosen: tuple[str, ...] = ()
    sev0 = max(0.0, 1.0 - quality)
    if quality < 0.8:
        k = 1 if rng.random() < 0.6 else 2
        chosen = tuple(str(d) for d in rng.choice(_DEGRADATIONS, size=k, replace=False))
        sev = (0.8 - quality) / 0.7 + 0.25
        for d in chosen:
            if d == "low_gain":
                gain -= 10 + 22 * sev
            elif d == "haze":
                haze = 0.4 + 4.0 * sev
                noise += 12 * sev
            elif d == "motion_blur":
                blur = 2.0 + 10.0 * sev
            elif d == "poor_contact":
                dropout = (
                    float(rng.uniform(0.1, 0.9)),
                    float(rng.uniform(0.2, 0.5)),
                    12 + 25 * sev,
                )
            elif d == "off_axis":
                off = 2.0 + 7.0 * sev
    else:
        # Good images still vary a little.
        haze = float(rng.uniform(0, 0.1)) * sev0 * 5
    return _QualityPlan(quality, gain, haze, noise, blur, dropout, off, chosen)


def _quantise_depth(anat: Anatomy) -> Anatomy:
    # Scanners offer discrete depth steps; this also lets the scan converter cache hit.
    g = anat.geometry
    step = 10.0 if g.depth_mm > 80 else 5.0
    depth = max(step, round(g.depth_mm / step) * step)
    return dataclasses.replace(anat, geometry=dataclasses.replace(g, depth_mm=depth))


class _FrameMaker:
    """Everything fixed over a loop: anatomy, grid, layout, acquisition settings."""

    def __init__(
        self,
        anat: Anatomy,
        style: VendorStyle,
        size: tuple[int, int],
        plan: _QualityPlan,
        rng: np.random.Generator,
        overlays: bool,
        frame_rate: float,
    ) -> None:
        _rows, _cols = size
        self.anat, self.style, self.plan, self.overlays = anat, style, plan, overlays
        self.frame_rate = frame_rate
        geo = anat.geometry
        self.layout = fit_layout(
            geo,
            size,
            top_margin=style.top_margin,
            offset=style.region_offset,
            width_fraction=0.7 if geo.kind is not ProbeKind.LINEAR else 0.66,
        )
        px_h = geo.depth_mm / self.layout.spacing_mm
        x0, x1, _, _ = geo.extent()
        px_w = (x1 - x0) / self.layout.spacing_mm
        # Linear (high-frequency) probes resolve finer speckle: sample them more densely.
        fine = 1.35 if geo.kind is ProbeKind.LINEAR else 1.0
        n_r = int(np.clip(px_h * 0.85 * fine, 48, 1024))
        n_l = int(np.clip(px_w * style.line_density * fine, 32, 512))
        self.grid = BeamGrid(geo, n_r, n_l)
        self.conv = scan_converter(self.grid, self.layout)
        tgc = smooth_field(rng, (n_r, 1), 1.2, cells=4)[:, 0]
        self.acq = Acquisition(
            frequency_mhz=anat.frequency_mhz,
            dynamic_range_db=style.dynamic_range_db + float(rng.normal(0, 2)),
            gain_db=style.gain_db + plan.gain_db,
            psf_axial=style.psf_axial,
            psf_lateral=style.psf_lateral,
            focus_mm=anat.focus_mm,
            noise_deep_db=plan.noise_deep_db,
            tgc_error_db=(10 * np.log10(tgc)).astype(np.float32),
            motion_blur=plan.motion_blur,
            haze=plan.haze,
            dropout=plan.dropout,
            speckle_reduction=style.speckle_reduction,
        )
        self.show_calipers = bool(rng.random() < 0.25) and bool(anat.calipers)
        self.patient_id = f"SIM{int(rng.integers(10**6)):06d}"
        self.lut = grey_map(style)
        self.noise: np.ndarray | None = None
        self.prev_shift = (0, 0)

    def frame(self, t: float, rng: np.random.Generator, loop: bool) -> SimFrame:
        anat, grid = self.anat, self.grid
        pose = anat.pose(t)
        canvas = Canvas(grid, pose=pose, background=anat.background)
        anat.paint(canvas, t)
        if self.plan.off_axis > 0:
            s = self.plan.off_axis
            canvas.echo = ndimage.gaussian_filter(canvas.echo, (s, s * 0.6))
            canvas.coherent = ndimage.gaussian_filter(canvas.coherent, (s, s * 0.6)) * 0.5
        noise = None
        if loop:
            fresh = rng.standard_normal((2, *grid.shape), dtype=np.float32)
            if self.noise is None:
                noise = fresh
            else:
                # Speckle follows the tissue and decorrelates a little each frame.
                line_mm = (
                    grid.geometry.width_mm / grid.n_lines
                    if grid.geometry.kind is ProbeKind.LINEAR
                    else grid.geometry.angle_rad / grid.n_lines * 60.0
                )
                shift = (round(pose.dz / grid.dr), round(pose.dx / line_mm))
                d = (shift[0] - self.prev_shift[0], shift[1] - self.prev_shift[1])
                rho = 1.0 - anat.decorrelation
                noise = rho * np.roll(self.noise, d, axis=(1, 2)) + math.sqrt(1 - rho**2) * fresh
                self.prev_shift = shift
            if self.noise is None:
                self.prev_shift = (round(pose.dz / grid.dr), 0)
            self.noise = noise
        beam = form_beam_image(canvas, self.acq, rng, noise=noise)
        disp = self.conv(beam)
        idx = np.clip(np.round(disp * 255.0), 0, 255).astype(np.uint8)
        pixels = self.lut[idx]
        pixels[~self.conv.mask] = 0
        geo = grid.geometry
        lay = self.layout
        ref = (lay.center_col - 0.5, lay.top - lay.z0 / lay.spacing_mm - 0.5)
        cal_px: list[tuple[tuple[float, float], tuple[float, float]]] = []
        cal_mm: tuple[float, ...] = ()
        if self.show_calipers:
            pairs = anat.calipers[:1]
            cal_mm = caliper_length_mm(pairs)
            for a, b in pairs:
                pts = []
                for bx, bz in (a, b):
                    px, pz = canvas._to_probe(np.array([bx]), np.array([bz]))
                    pts.append(
                        (
                            ref[0] + float(px[0]) / lay.spacing_mm,
                            ref[1] + float(pz[0]) / lay.spacing_mm,
                        )
                    )
                cal_px.append((pts[0], pts[1]))
        if self.overlays:
            info = OverlayInfo(
                probe_label=_PROBE_LABEL[geo.kind],
                preset=_PRESET[anat.view],
                frequency_mhz=anat.frequency_mhz,
                gain_db=self.acq.gain_db,
                dynamic_range_db=self.acq.dynamic_range_db,
                depth_mm=geo.depth_mm,
                focus_mm=anat.focus_mm,
                frame_rate_hz=self.frame_rate,
                patient_id=self.patient_id,
                date_text="2024-03-14 10:22",
                top_row=lay.top,
                px_per_mm=1.0 / lay.spacing_mm,
                bbox=self.conv.bbox,
                calipers=tuple(cal_px),
                caliper_mm=cal_mm,
            )
            pixels = draw_overlays(pixels, style=self.style, info=info)
        labels: dict[str, str | float | None] = {
            "view": anat.view,
            "nodule": anat.labels.get("nodule"),
            "lung_pattern": anat.labels.get("lung_pattern"),
            "quality": round(self.plan.quality, 4),
            "vendor": self.style.name,
        }
        findings = dict(anat.findings)
        findings["degradations"] = list(self.plan.degradations)
        acq = {
            "probe": geo.kind.value,
            "depth_mm": geo.depth_mm,
            "frequency_mhz": round(anat.frequency_mhz, 2),
            "reference_pixel": (round(ref[0], 2), round(ref[1], 2)),
            "time_s": t,
            "frame_rate_hz": self.frame_rate,
            "burned_in_annotation": self.overlays,
            "calipers_shown": bool(cal_px) and self.overlays,
        }
        return SimFrame(
            pixels=np.ascontiguousarray(pixels),
            scan_mask=self.conv.mask.copy(),
            scan_bbox=self.conv.bbox,
            labels=labels,
            findings=findings,
            spacing_mm=lay.spacing_mm,
            acquisition=acq,
        )


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 64 or max(size) > 2048:
        raise ValueError(f"size must be (rows, cols) with each in [64, 2048], got {size}")
    return int(size[0]), int(size[1])


def _maker(
    view: str,
    vendor: str | VendorStyle,
    rng: np.random.Generator,
    size: tuple[int, int],
    nodule: str | None,
    lung_pattern: str | None,
    quality: float | None,
    overlays: bool,
) -> _FrameMaker:
    style = get_vendor(vendor)
    size = _check_size(size)
    anat = _quantise_depth(
        sample_anatomy(view, style=style, rng=rng, nodule=nodule, lung_pattern=lung_pattern)
    )
    plan = _quality_plan(quality, rng)
    fr = float(rng.uniform(40, 60) if view == View.CARDIAC_4CH.value else rng.uniform(18, 32))
    return _FrameMaker(anat, style, size, plan, rng, overlays, round(fr))


def simulate_image(
    view: str,
    *,
    vendor: str | VendorStyle,
    rng: np.random.Generator,
    size: tuple[int, int] = (480, 640),
    nodule: str | None = None,
    lung_pattern: str | None = None,
    quality: float | None = None,
    overlays: bool = True,
) -> SimFrame:
    """Simulate one B-mode frame.

    Parameters
    ----------
    view
        One of :data:`~simulator.VIEWS`.
    vendor
        A key of :data:`~simulator.VENDOR_STYLES`, or a :class:`VendorStyle` itself.
    rng
        Random generator; the same seed gives the same frame.
    size
        Output ``(rows, cols)``.
    nodule
        Thyroid views: ``none``, ``benign`` or ``malignant``; ``None`` draws one at random.
    lung_pattern
        Lung view: ``normal``, ``b_lines`` or ``consolidation``; ``None`` draws one.
    quality
        Target image quality in [0, 1] (below 0.8 the image is degraded); ``None`` draws one
        (mostly good).
    overlays
        Burn in the vendor UI (text, ruler, logo, sometimes calipers).

    Returns
    -------
    SimFrame
        Pixels, scan mask and box, labels and detailed findings.

    Raises
    ------
    ValueError
        For an unknown view or vendor, a label that does not fit the view, a quality
        outside [0, 1] or an unusable size.
    """
    maker = _maker(view, vendor, rng, size, nodule, lung_pattern, quality, overlays)
    return maker.frame(0.0, rng, loop=False)


def simulate_loop(
    view: str,
    *,
    vendor: str | VendorStyle,
    rng: np.random.Generator,
    n_frames: int,
    size: tuple[int, int] = (480, 640),
    nodule: str | None = None,
    lung_pattern: str | None = None,
    quality: float | None = None,
    overlays: bool = True,
) -> list[SimFrame]:
    """Simulate a cine loop of one anatomy moving (probe drift, breathing, heart beat).

    Parameters are those of :func:`simulate_image`, plus ``n_frames`` (at least 1). All
    frames share the labels; ``SimFrame.acquisition["time_s"]`` gives each frame's time
    and ``["frame_rate_hz"]`` the rate.

    Raises
    ------
    ValueError
        As :func:`simulate_image`, or if ``n_frames`` < 1.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    maker = _maker(view, vendor, rng, size, nodule, lung_pattern, quality, overlays)
    return [maker.frame(i / maker.frame_rate, rng, loop=True) for i in range(n_frames)]
