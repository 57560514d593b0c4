"""Quality control of decoded ultrasound instances before they are shown to the models.

Every check yields a :class:`~dicom_sr.model.QCCheck` with a stable reason code
(:class:`QCCode`), the measured value and the threshold it was compared with (all limits
in :class:`QCThresholds`), and its outcome (pass, warn or fail), passing ones included, so
the report and the drift monitor see the figures. Checks made per frame (``blank``,
``saturated``, ``low_contrast``) exclude the failing frames from ``usable_frames`` (a
loop with some failing frames is warned about); the instance fails when no frame is left.
Pixel data that cannot be decoded never reaches these checks: it fails with the reason
code of :class:`workers.imaging.pixels.PixelErrorReason` (``undecodable``,
``unsupported_photometric``, ``no_pixel_data``, ``not_image``).

The measures are plain statistics over the scan region (see :mod:`workers.imaging.scan_region`);
no library provides ultrasound QC, so they are written here on numpy and scipy.ndimage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum

import numpy as np
from scipy import ndimage

from dicom_sr.model import QCCheck, QCOutcome
from workers.imaging.pixels import grey_frames
from workers.imaging.scan_region import RegionSource, ScanRegion, find_scan_region
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance, UltrasoundRegion

logger = logging.getLogger(__name__)

#: Physical Units X Direction (0018,6024) value for centimetres.
_UNITS_CM = 3


class QCCode(StrEnum):
    """Stable reason codes of the quality-control checks."""

    NOT_US = "not_us"
    """Modality is not one the node analyses (US)."""
    NO_SCAN_REGION = "no_scan_region"
    """No ultrasound image region could be found in the frame."""
    LOW_RESOLUTION = "low_resolution"
    """The scan region's short side is smaller than the models need."""
    BLANK = "blank"
    """Nearly empty scan region (probe in air, frozen black screen)."""
    SATURATED = "saturated"
    """Too many clipped (white) pixels in the scan region."""
    LOW_CONTRAST = "low_contrast"
    """Narrow dynamic range inside the scan region."""
    COLOUR_DOPPLER = "colour_doppler"
    """Coloured pixels (colour or power Doppler) inside the scan region."""
    ANNOTATION_OVER_ANATOMY = "annotation_over_anatomy"
    """Text, calipers or other graphics burned into the scan region."""
    FROZEN_LOOP = "frozen_loop"
    """A cine loop whose frames are identical."""
    TOO_SHORT_LOOP = "too_short_loop"
    """A cine loop with too few frames or too short a duration."""
    NO_USABLE_IMAGE = "no_usable_image"
    """Study level: no instance has a frame the models may see."""
    TOO_FEW_USABLE_IMAGES = "too_few_usable_images"
    """Study level: fewer usable instances than wanted for a study conclusion."""
    NOT_ULTRASOUND = "not_ultrasound"
    """Study level: no instance of an accepted modality."""


@dataclass(frozen=True)
class QCThresholds:
    """Limits of the quality-control checks (grey levels are 0-255, fractions 0-1).

    Defaults were set on real screen captures and on the simulator's vendor styles so
    that good frames pass all checks.
    """

    min_region_fraction: float = 0.02
    """Scan region area, as a fraction of the frame, below which no image was found."""
    min_region_side_fail: int = 128
    """Scan region short side (pixels) below which the instance fails."""
    min_region_side_warn: int = 192
    """Short side below which it is only warned about (models resize to ~224)."""
    blank_level: int = 24
    """Grey level below which a region pixel is dark (noise, air, anechoic)."""
    blank_fraction: float = 0.9
    """Fraction of dark region pixels from which a frame is blank (fails): a probe in air
    shows only faint noise and a few reverberation bands near the top. Good frames stay
    below about 0.8 even in lung, whose deep part is black."""
    saturated_level: int = 250
    """Level (of the brightest channel) counted as clipped."""
    saturated_warn: float = 0.05
    """Fraction of clipped region pixels above which a frame is warned about."""
    saturated_fail: float = 0.25
    """Fraction above which it fails."""
    low_contrast_warn: float = 60.0
    """Robust dynamic range (99th - 1st percentile) below which a frame is warned about."""
    low_contrast_fail: float = 30.0
    """Dynamic range below which it fails."""
    colour_residual: float = 40.0
    """Distance (grey levels) from the image's grey/tint axis above which a pixel is coloured."""
    colour_warn: float = 0.005
    """Fraction of coloured region pixels above which Doppler is flagged (warn)."""
    colour_fail: float = 0.3
    """Fraction above which the colour hides the B-mode the models read (fails)."""
    annotation_contrast: float = 50.0
    """White top-hat (3x3) response above which a pixel may be on a thin burned-in line."""
    annotation_warn: int = 12
    """Pixels on thin straight lines in the region from which annotation is flagged (warn)."""
    frozen_diff: float = 0.5
    """Mean absolute difference (grey levels) below which two frames are identical."""
    min_loop_frames: int = 4
    """A stored loop with fewer frames (but more than one) is too short (warn)."""
    min_loop_seconds: float = 0.3
    """A loop shorter than this (when Frame Time is known) is too short (warn)."""
    min_usable_images: int = 2
    """Usable instances below which a study is warned about (``too_few_usable_images``)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"QCThresholds.{f.name} must be a number >= 0, got {value!r}")
        if self.min_region_side_fail > self.min_region_side_warn:
            raise ValueError("min_region_side_fail must not exceed min_region_side_warn")
        if self.saturated_warn > self.saturated_fail:
            raise ValueError("saturated_warn must not exceed saturated_fail")
        if self.low_contrast_fail > self.low_contrast_warn:
            raise ValueError("low_contrast_fail must not exceed low_contrast_warn")
        if self.colour_warn > self.colour_fail:
            raise ValueError("colour_warn must not exceed colour_fail")
        if self.blank_fraction > 1 or self.saturated_fail > 1 or self.colour_fail > 1:
            raise ValueError("fractions (blank_fraction, saturated_*, colour_*) must be <= 1")


_DEFAULT_THRESHOLDS = QCThresholds()
_SEVERITY = {QCOutcome.PASS: 0, QCOutcome.WARN: 1, QCOutcome.FAIL: 2}


def _worst(outcomes: Sequence[QCOutcome]) -> QCOutcome:
    return max(outcomes, key=_SEVERITY.__getitem__, default=QCOutcome.PASS)


@dataclass(frozen=True)
class _FrameStats:
    mean: float
    std: float
    contrast: float
    saturated: float
    dark: float


def _frame_stats(values: np.ndarray, peaks: np.ndarray, t: QCThresholds) -> _FrameStats:
    """Statistics of one frame's sampled region pixels: ``values`` grey, ``peaks`` the
    brightest channel of the same pixels."""
    p1, p99 = np.percentile(values, (1, 99))
    size = max(values.size, 1)
    return _FrameStats(
        mean=float(values.mean()),
        std=float(values.std()),
        contrast=float(p99 - p1),
        saturated=float(np.count_nonzero(peaks >= t.saturated_level) / size),
        dark=float(np.count_nonzero(values < t.blank_level) / size),
    )


def speckle_grain(grey: np.ndarray, inner: np.ndarray, bbox: tuple[int, int, int, int]) -> float:
    """Neighbour correlation of the scan region's fine texture: the mean of the axial and
    lateral lag-1 autocorrelations of ``grey`` (one frame) minus its 9-pixel local mean,
    over pixel pairs inside ``inner``.

    Speckle is the image of the probe's point spread: a wider beam or sparser scan lines
    (a coarser or failing probe, a blurring preset) make neighbouring pixels more alike,
    while gain and grey maps, which only rescale the texture, leave the correlation as it
    is. Written here because no imaging library measures it inside an arbitrary mask (the
    grey-level co-occurrence correlation of scikit-image needs a rectangle and quantised
    levels, and would count the black background).
    """
    c0, r0, c1, r1 = bbox
    crop = grey[r0:r1, c0:c1].astype(np.float32, copy=False)
    mask = inner[r0:r1, c0:c1]
    if crop.shape[0] < 3 or crop.shape[1] < 3 or not mask.any():
        return float("nan")
    detail = crop - ndimage.uniform_filter(crop, 9)
    correlations = []
    for a, b, both in ((detail[:-1], detail[1:], mask[:-1] & mask[1:]),
                       (detail[:, :-1], detail[:, 1:], mask[:, :-1] & mask[:, 1:])):
        x, y = a[both], b[both]
        denominator = float(np.sqrt(np.dot(x, x) * np.dot(y, y)))
        if denominator <= 0.0:
            return float("nan")
        correlations.append(float(np.dot(x, y)) / denominator)
    return float(np.mean(correlations))


def _colour_fraction(pixels: np.ndarray, residual: float) -> float:
    """Fraction of ``(n, 3)`` pixels away from the image's own grey map.

    Vendors tint their grey maps (sepia, blue), with a hue that may change with
    brightness, so the reference is the grey map's colour at the same brightness (16
    bins), not (1, 1, 1): the median of the least chromatic pixels of the bin. A bin
    whose least chromatic pixel is far more chromatic than those of the bins around it
    holds no grey-map pixel at all (Doppler covers that brightness): all of it counts.
    """
    if pixels.size == 0:
        return 0.0
    chroma = pixels.max(axis=1).astype(np.int16) - pixels.min(axis=1)
    if int(chroma.max()) <= residual:
        # No pixel is far enough from neutral grey to count, whatever the tint.
        return 0.0
    p = pixels.astype(np.float32)
    level = np.minimum(p.sum(axis=1) * np.float32(16 / 766), 15).astype(np.intp)
    bins = np.unique(level)
    lowest = {int(b): int(chroma[level == b].min()) for b in bins}
    off = np.zeros(p.shape[0], dtype=np.float32)
    for b in bins:
        sel = level == b
        around = [lowest[k] for k in range(b - 2, b + 3) if k != b and k in lowest]
        if around and lowest[int(b)] > min(around) + residual:
            off[sel] = np.inf
            continue
        q = p[sel]
        ref = np.median(q[chroma[sel] <= lowest[int(b)] + residual / 2], axis=0)
        norm = float(np.linalg.norm(ref))
        if norm < 1e-3:
            off[sel] = np.linalg.norm(q, axis=1)
            continue
        axis = ref / norm
        off[sel] = np.linalg.norm(q - (q @ axis)[:, None] * axis[None, :], axis=1)
    return float(np.count_nonzero(off > residual) / p.shape[0])


def _annotation_pixels(
    grey: np.ndarray, region: ScanRegion, inner: np.ndarray, contrast: float
) -> int:
    """Pixels of thin straight bright lines inside the region (text strokes, caliper
    crosses): far brighter than the 3x3 grey opening (narrower than 3 pixels) along a
    horizontal or vertical run of at least 7 pixels. Speckle grains are wider, smoother
    and shorter; the region's outline is excluded."""
    c0, r0, c1, r1 = region.bbox
    crop = np.rint(grey[r0:r1, c0:c1]).astype(np.uint8)
    tophat = crop.astype(np.int16) - ndimage.grey_opening(crop, size=(3, 3))
    thin = ((tophat > contrast) & inner[r0:r1, c0:c1]).astype(np.uint8)
    if not thin.any():
        return 0
    runs = ndimage.minimum_filter1d(thin, 7, axis=0) | ndimage.minimum_filter1d(thin, 7, axis=1)
    return int(np.count_nonzero(runs))


def _pixel_spacing_mm(regions: Sequence[UltrasoundRegion]) -> float | None:
    """Horizontal pixel size (mm) of the header's 2D tissue region calibrated in cm."""
    for reg in regions:
        if (
            reg.spatial_format in (1, None)
            and reg.physical_units_x == _UNITS_CM
            and reg.physical_delta_x is not None
            and reg.physical_delta_x > 0
        ):
            return float(reg.physical_delta_x) * 10.0
    return None


def _per_frame_check(
    code: QCCode,
    fails: Sequence[bool],
    warns: Sequence[bool],
    value: float,
    threshold: float,
    what: str,
) -> QCCheck:
    n = len(fails)
    n_fail, n_warn = sum(fails), sum(warns)
    if n_fail == n:
        outcome = QCOutcome.FAIL
        message = f"{what} in every frame" if n > 1 else what
    elif n_fail:
        outcome = QCOutcome.WARN
        message = f"{what} in {n_fail} of {n} frames (excluded)"
    elif n_warn:
        outcome = QCOutcome.WARN
        message = (
            f"{what} (borderline) in {n_warn} of {n} frames" if n > 1 else f"{what} (borderline)"
        )
    else:
        outcome = QCOutcome.PASS
        message = f"no {what}"
    return QCCheck(code.value, outcome, message, value=round(value, 4), threshold=threshold)


def assess_instance(
    inst: DecodedInstance,
    thresholds: QCThresholds = _DEFAULT_THRESHOLDS,
    *,
    accept_modalities: Sequence[str] = ("US",),
) -> InstanceQC:
    """Check one decoded instance (image or cine loop) for fitness for the models.

    Parameters
    ----------
    inst
        Decoded frames and header fields (:func:`workers.imaging.pixels.load_instance`).
    thresholds
        Limits of the checks.
    accept_modalities
        Modalities analysed; others fail ``not_us``.

    Returns
    -------
    InstanceQC
        Outcome, every check (passing ones included, with their values), the usable
        frames, the scan region and input statistics for drift monitoring.
    """
    t = thresholds
    frames = inst.frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (N, rows, cols, 3) with N >= 1, got {frames.shape}")
    n, rows, cols = frames.shape[:3]
    checks: list[QCCheck] = []
    stats: dict[str, float] = {"frames": float(n), "rows": float(rows), "columns": float(cols)}

    modality_ok = inst.modality.upper() in {m.upper() for m in accept_modalities}
    checks.append(
        QCCheck(
            QCCode.NOT_US.value,
            QCOutcome.PASS if modality_ok else QCOutcome.FAIL,
            f"modality {inst.modality or '(missing)'}"
            + ("" if modality_ok else f" is not one of {', '.join(accept_modalities)}"),
        )
    )

    grey = grey_frames(frames)
    region = find_scan_region(frames, inst.us_regions, grey=grey)
    fraction = 0.0 if region is None else region.area / float(rows * cols)
    if region is None or fraction < t.min_region_fraction:
        checks.append(
            QCCheck(
                QCCode.NO_SCAN_REGION.value,
                QCOutcome.FAIL,
                "no ultrasound image region found in the frame"
                if region is None
                else f"only a {region.width}x{region.height} px textured area found",
                value=round(fraction, 4),
                threshold=t.min_region_fraction,
            )
        )
        return InstanceQC(QCOutcome.FAIL, tuple(checks), (), stats=stats)

    stats.update(
        region_fraction=fraction,
        region_width=float(region.width),
        region_height=float(region.height),
        region_from_header=float(region.source is not RegionSource.IMAGE),
    )
    spacing = _pixel_spacing_mm(inst.us_regions)
    if spacing is not None:
        stats["pixel_spacing_mm"] = spacing
    checks.append(
        QCCheck(
            QCCode.NO_SCAN_REGION.value,
            QCOutcome.PASS,
            f"scan region ({region.shape.value}) {region.width}x{region.height} px at "
            f"({region.bbox[0]}, {region.bbox[1]}) from {region.source.value}",
            value=round(fraction, 4),
            threshold=t.min_region_fraction,
        )
    )
    side = min(region.width, region.height)
    if side < t.min_region_side_fail:
        res_outcome, res_thr = QCOutcome.FAIL, t.min_region_side_fail
    elif side < t.min_region_side_warn:
        res_outcome, res_thr = QCOutcome.WARN, t.min_region_side_warn
    else:
        res_outcome, res_thr = QCOutcome.PASS, t.min_region_side_warn
    checks.append(
        QCCheck(
            QCCode.LOW_RESOLUTION.value,
            res_outcome,
            f"scan region short side {side} px",
            value=float(side),
            threshold=float(res_thr),
        )
    )

    # Statistics leave out a 3-pixel band along the outline: the polygon's edge pixels
    # mix tissue with the black background.
    c0, r0, c1, r1 = region.bbox
    inner = np.zeros_like(region.mask)
    inner[r0:r1, c0:c1] = ndimage.minimum_filter(region.mask[r0:r1, c0:c1].view(np.uint8), 7).view(
        bool
    )
    if not inner.any():
        inner = region.mask
    flat_idx = np.flatnonzero(inner)
    sample = flat_idx[:: max(1, flat_idx.size // 20000)]
    region_values = grey.reshape(n, -1)[:, sample]
    # Clipping is judged on the brightest channel: a tinted grey map's white is not grey.
    peak_values = frames.reshape(n, -1, 3)[:, sample].max(axis=2)
    per = [_frame_stats(region_values[i], peak_values[i], t) for i in range(n)]

    blank = [s.dark >= t.blank_fraction for s in per]
    sat_fail = [s.saturated > t.saturated_fail for s in per]
    sat_warn = [s.saturated > t.saturated_warn for s in per]
    con_fail = [s.contrast < t.low_contrast_fail and not b for s, b in zip(per, blank, strict=True)]
    con_warn = [s.contrast < t.low_contrast_warn and not b for s, b in zip(per, blank, strict=True)]
    checks.append(
        _per_frame_check(
            QCCode.BLANK,
            blank,
            [False] * n,
            max(s.dark for s in per),
            t.blank_fraction,
            "blank scan region (probe in air?)",
        )
    )
    checks.append(
        _per_frame_check(
            QCCode.SATURATED,
            sat_fail,
            sat_warn,
            max(s.saturated for s in per),
            t.saturated_fail if any(sat_fail) else t.saturated_warn,
            "saturation",
        )
    )
    checks.append(
        _per_frame_check(
            QCCode.LOW_CONTRAST,
            con_fail,
            con_warn,
            min(s.contrast for s in per),
            t.low_contrast_fail if any(con_fail) else t.low_contrast_warn,
            "low contrast",
        )
    )
    usable = [i for i in range(n) if not (blank[i] or sat_fail[i] or con_fail[i])]
    stats["excluded_frames"] = float(n - len(usable))

    rgb_sample = frames.reshape(n, -1, 3)[:, sample[:: 4 * max(1, n // 2)]].reshape(-1, 3)
    colour = _colour_fraction(rgb_sample, t.colour_residual)
    if colour > t.colour_fail:
        colour_outcome, colour_thr = QCOutcome.FAIL, t.colour_fail
        colour_msg = "colour (Doppler) covers the scan region; the models read grey B-mode"
    elif colour > t.colour_warn:
        colour_outcome, colour_thr = QCOutcome.WARN, t.colour_warn
        colour_msg = "colour pixels in the scan region (Doppler?); the models read grey B-mode"
    else:
        colour_outcome, colour_thr = QCOutcome.PASS, t.colour_warn
        colour_msg = "grey-scale scan region"
    checks.append(
        QCCheck(
            QCCode.COLOUR_DOPPLER.value,
            colour_outcome,
            colour_msg,
            value=round(colour, 5),
            threshold=colour_thr,
        )
    )
    if colour_outcome is QCOutcome.FAIL:
        usable = []
    first = usable[0] if usable else 0
    annotation = _annotation_pixels(grey[first], region, inner, t.annotation_contrast)
    grain = speckle_grain(grey[first], inner, region.bbox)
    if np.isfinite(grain):
        stats["speckle_grain"] = grain
    checks.append(
        QCCheck(
            QCCode.ANNOTATION_OVER_ANATOMY.value,
            QCOutcome.WARN if annotation >= t.annotation_warn else QCOutcome.PASS,
            "text or calipers burned into the scan region"
            if annotation >= t.annotation_warn
            else "no annotation over the anatomy",
            value=float(annotation),
            threshold=float(t.annotation_warn),
        )
    )

    if n > 1:
        # Motion between consecutive frames that passed the per-frame checks: a frame that
        # failed (blank, clipped) is no motion of the anatomy.
        kept = usable if len(usable) >= 2 else list(range(n))
        diffs = np.abs(np.diff(region_values[kept], axis=0)).mean(axis=1)
        stats.update(
            motion_mean=float(diffs.mean()),
            motion_min=float(diffs.min()),
            motion_max=float(diffs.max()),
        )
        frozen = bool(np.all(diffs < t.frozen_diff))
        checks.append(
            QCCheck(
                QCCode.FROZEN_LOOP.value,
                QCOutcome.WARN if frozen else QCOutcome.PASS,
                "all frames of the loop are identical (one kept)"
                if frozen
                else f"loop frames differ (mean change {float(diffs.mean()):.1f} grey levels)",
                value=round(float(diffs.min()), 4),
                threshold=t.frozen_diff,
            )
        )
        if frozen:
            usable = usable[:1]
    if inst.number_of_frames > 1:
        duration = (
            inst.number_of_frames * inst.frame_time_ms / 1000.0 if inst.frame_time_ms else None
        )
        short = inst.number_of_frames < t.min_loop_frames or (
            duration is not None and duration < t.min_loop_seconds
        )
        if duration is not None:
            stats["loop_seconds"] = duration
        checks.append(
            QCCheck(
                QCCode.TOO_SHORT_LOOP.value,
                QCOutcome.WARN if short else QCOutcome.PASS,
                f"loop of {inst.number_of_frames} frames"
                + (f", {duration:.2f} s" if duration is not None else ""),
                value=float(inst.number_of_frames),
                threshold=float(t.min_loop_frames),
            )
        )

    if not modality_ok:
        usable = []
    means = [per[i].mean for i in usable] or [s.mean for s in per]
    stds = [per[i].std for i in usable] or [s.std for s in per]
    stats.update(
        mean=float(np.mean(means)),
        std=float(np.mean(stds)),
        contrast=float(np.mean([s.contrast for s in per])),
        saturated_fraction=float(np.mean([s.saturated for s in per])),
        colour_fraction=colour,
        annotation_pixels=float(annotation),
        usable_frames=float(len(usable)),
    )
    outcome = _worst([c.outcome for c in checks])
    if not usable:
        outcome = QCOutcome.FAIL
    return InstanceQC(
        outcome=outcome,
        checks=tuple(checks),
        usable_frames=tuple(usable),
        scan_region=region.bbox,
        scan_mask=region.mask,
        colour_fraction=colour,
        stats=stats,
    )


def assess_study(
    prepared: Sequence[PreparedInstance],
    thresholds: QCThresholds = _DEFAULT_THRESHOLDS,
    *,
    accept_modalities: Sequence[str] = ("US",),
) -> tuple[bool, tuple[QCCheck, ...]]:
    """Study-level QC: is there enough usable input for a study conclusion?

    Returns
    -------
    tuple[bool, tuple[QCCheck, ...]]
        Whether the study is assessable (no study-level check failed) and the checks
        ``not_ultrasound``, ``no_usable_image`` and ``too_few_usable_images``.
    """
    accepted = {m.upper() for m in accept_modalities}
    n_us = sum(1 for p in prepared if p.instance.modality.upper() in accepted)
    n_usable = sum(1 for p in prepared if not p.qc.failed)
    checks = [
        QCCheck(
            QCCode.NOT_ULTRASOUND.value,
            QCOutcome.PASS if n_us else QCOutcome.FAIL,
            f"{n_us} of {len(prepared)} instances are ultrasound",
            value=float(n_us),
            threshold=1.0,
        ),
        QCCheck(
            QCCode.NO_USABLE_IMAGE.value,
            QCOutcome.PASS if n_usable else QCOutcome.FAIL,
            f"{n_usable} of {len(prepared)} instances usable",
            value=float(n_usable),
            threshold=1.0,
        ),
        QCCheck(
            QCCode.TOO_FEW_USABLE_IMAGES.value,
            QCOutcome.WARN if 0 < n_usable < thresholds.min_usable_images else QCOutcome.PASS,
            f"{n_usable} usable instances (wanted {thresholds.min_usable_images})",
            value=float(n_usable),
            threshold=float(thresholds.min_usable_images),
        ),
    ]
    assessable = all(c.outcome is not QCOutcome.FAIL for c in checks)
    return assessable, tuple(checks)
