"""Quality control and scan-region detection on synthetic and real frames (workers/imaging)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from dicom_sr.model import QCOutcome
from workers.imaging.qc import QCCode, QCThresholds, assess_instance, assess_study
from workers.imaging.scan_region import RegionShape, RegionSource, find_scan_region
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance, UltrasoundRegion
from workers.models.preprocess import frame_for_model

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "sononet" / "example_images"
if not EXAMPLES.is_dir():
    EXAMPLES = Path("/work/shared/sononet/example_images")


def sector(
    rng: np.random.Generator,
    *,
    size: tuple[int, int] = (480, 640),
    kind: str = "curvilinear",
    scale: float = 1.0,
    level: float = 90.0,
    spread: float = 1.0,
    ui: bool = True,
    anechoic: bool = True,
    blur: tuple[float, float] = (0.8, 1.4),
) -> tuple[np.ndarray, np.ndarray]:
    """A speckled sector (or rectangle) on black with vendor-like text, ruler and bar.

    Returns ``(rgb uint8 (H, W, 3), mask bool (H, W))``.
    """
    rows, cols = size
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cx, top = cols / 2, rows * 0.08
    depth = rows * 0.85 * scale
    if kind == "linear":
        half = cols * 0.3 * scale
        mask = (np.abs(xx - cx) <= half) & (yy >= top) & (yy <= top + depth)
    else:
        r0 = 40.0 * scale if kind == "curvilinear" else 0.0
        apex_y = top - r0
        r = np.hypot(xx - cx, yy - apex_y)
        ang = np.degrees(np.arctan2(xx - cx, yy - apex_y))
        mask = (r >= r0) & (r <= r0 + depth) & (np.abs(ang) <= 35)
    speckle = rng.rayleigh(1.0, size).astype(np.float32)
    speckle = ndimage.gaussian_filter(speckle, blur)  # the probe's point spread
    speckle /= speckle.mean()
    tissue = level * (1 + 0.6 * spread * (speckle - 1))
    blob = np.hypot(xx - cx, yy - (top + depth * 0.5)) < depth * 0.12
    if anechoic:
        tissue[blob] *= 0.2  # an anechoic structure
    grey = np.where(mask, np.clip(tissue, 0, 255), 0).astype(np.uint8)
    img = Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if ui:
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(["C5-1", "ABD", "4.5MHz", "G 50", "DR 60", "D 16cm"]):
            draw.text((6, 20 + 14 * i), text, fill=(230, 230, 230))
        draw.text((cols - 90, 6), "ACME 3000", fill=(255, 255, 255))
        for k in range(12):  # depth ruler
            y = int(top + k * depth / 11)
            draw.line([(cols - 20, y), (cols - 14, y)], fill=(200, 200, 200))
        for y in range(60, 160):  # grey bar
            draw.line([(cols - 40, y), (cols - 34, y)], fill=(255 - (y - 60) * 2,) * 3)
    return np.asarray(img).copy(), mask


def instance(
    frames: np.ndarray,
    *,
    modality: str = "US",
    number_of_frames: int | None = None,
    frame_time_ms: float | None = None,
    us_regions: tuple[UltrasoundRegion, ...] = (),
) -> DecodedInstance:
    built = DecodedInstance.from_pixels(
        frames,
        us_regions=us_regions,
        frame_time_ms=frame_time_ms,
        manufacturer="Test",
        modality=modality,
    )
    if number_of_frames is None:
        return built
    return dataclasses.replace(built, number_of_frames=number_of_frames)


def check(qc: InstanceQC, code: QCCode) -> QCOutcome:
    (found,) = [c for c in qc.checks if c.code == code.value]
    return found.outcome


def fired(qc: InstanceQC) -> dict[str, str]:
    return {c.code: c.outcome.value for c in qc.checks if c.outcome is not QCOutcome.PASS}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("kind", ["curvilinear", "phased", "linear"])
def test_good_frame_passes_and_region_found(rng: np.random.Generator, kind: str) -> None:
    rgb, mask = sector(rng, kind=kind)
    qc = assess_instance(instance(rgb))
    assert fired(qc) == {}, qc.checks
    assert qc.outcome is QCOutcome.PASS and qc.usable_frames == (0,)
    assert qc.scan_mask is not None and iou(qc.scan_mask, mask) >= 0.9
    for key in ("mean", "std", "region_fraction", "colour_fraction", "contrast"):
        assert key in qc.stats


def test_every_check_reported_with_value_and_threshold(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    qc = assess_instance(instance(np.stack([rgb, rgb[:, ::-1]]), number_of_frames=2))
    per_instance = set(QCCode) - {
        QCCode.NO_USABLE_IMAGE,
        QCCode.TOO_FEW_USABLE_IMAGES,
        QCCode.NOT_ULTRASOUND,
    }
    assert {c.code for c in qc.checks} == {code.value for code in per_instance}
    for c in qc.checks:
        assert c.outcome in set(QCOutcome)
        if c.code != QCCode.NOT_US.value:  # compared with the accepted modalities
            assert c.value is not None and c.threshold is not None, c


def test_not_us_fails(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    qc = assess_instance(instance(rgb, modality="CT"))
    assert check(qc, QCCode.NOT_US) is QCOutcome.FAIL
    assert qc.failed and qc.usable_frames == ()
    assert assess_instance(instance(rgb, modality="CT"), accept_modalities=("CT",)).usable_frames


def test_no_scan_region_on_black_frame() -> None:
    qc = assess_instance(instance(np.zeros((480, 640, 3), np.uint8)))
    assert check(qc, QCCode.NO_SCAN_REGION) is QCOutcome.FAIL
    assert qc.failed and qc.scan_region is None


def _reverberation(mask: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Probe in air: faint noise and bands fading with depth below the probe face."""
    top = np.where(mask.any(axis=0), mask.argmax(axis=0), 0)[None, :]
    depth = (np.arange(mask.shape[0])[:, None] - top).astype(np.float32)
    k = np.round(depth / 12.0)
    img = noise * rng.rayleigh(1.0, mask.shape).astype(np.float32)
    img += 140.0 * np.exp(-k / 2.5) * np.exp(-0.5 * ((depth - k * 12.0) / 1.5) ** 2)
    return np.where(mask, np.clip(img, 0, 255), 0).astype(np.uint8)


@pytest.mark.parametrize("kind", ["curvilinear", "phased", "linear"])
def test_blank_probe_in_air(rng: np.random.Generator, kind: str) -> None:
    # A faint sector (noise only): found, and blank, not "no scan region".
    rgb, mask = sector(rng, kind=kind, level=4.0)
    qc = assess_instance(instance(rgb))
    assert check(qc, QCCode.NO_SCAN_REGION) is QCOutcome.PASS
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL and qc.failed
    assert qc.scan_mask is not None and iou(qc.scan_mask, mask) >= 0.9
    # Reverberation bands below the probe face do not make it an image.
    air = rgb.copy()
    air[mask] = _reverberation(mask, rng, 3.0)[mask][:, None]
    qc = assess_instance(instance(air))
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL and qc.failed
    blank = next(c for c in qc.checks if c.code == "blank")
    assert blank.value is not None and blank.threshold == QCThresholds().blank_fraction
    assert blank.value >= blank.threshold
    # The header's region gives the rectangle even when the image is black.
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), 1, 1
    )
    qc = assess_instance(instance(np.zeros_like(rgb), us_regions=(header,)))
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL
    assert check(qc, QCCode.NO_SCAN_REGION) is QCOutcome.PASS


def test_dark_good_frame_is_not_blank(rng: np.random.Generator) -> None:
    """Half of the region black (a large anechoic area) is still an image."""
    rgb, mask = sector(rng, level=60.0)
    rows = np.nonzero(mask.any(axis=1))[0]
    dark = rgb.copy()
    dark[(rows[0] + rows[-1]) // 2 :][mask[(rows[0] + rows[-1]) // 2 :]] //= 8
    qc = assess_instance(instance(dark))
    assert check(qc, QCCode.BLANK) is QCOutcome.PASS and not qc.failed


def test_saturated(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng, level=240.0)
    qc = assess_instance(instance(rgb))
    assert check(qc, QCCode.SATURATED) is QCOutcome.FAIL and qc.failed
    rgb, _ = sector(rng, level=230.0)
    qc = assess_instance(instance(rgb))
    assert check(qc, QCCode.SATURATED) is QCOutcome.WARN and not qc.failed
    # A tinted grey map's white (sepia here) is clipped too, though its grey is not 250.
    rgb, _ = sector(rng, level=245.0)
    sepia = np.clip(rgb * np.array([1.0, 0.86, 0.7]), 0, 255).astype(np.uint8)
    qc = assess_instance(instance(sepia))
    assert check(qc, QCCode.SATURATED) is QCOutcome.FAIL


def test_low_contrast(rng: np.random.Generator) -> None:
    rgb, mask = sector(rng, level=120.0, spread=0.15, anechoic=False)
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), 1, 1
    )
    qc = assess_instance(instance(rgb, us_regions=(header,)))
    assert check(qc, QCCode.LOW_CONTRAST) is QCOutcome.FAIL
    assert check(qc, QCCode.BLANK) is QCOutcome.PASS
    rgb, _ = sector(rng, level=100.0, spread=1.0, anechoic=False)
    qc = assess_instance(instance(rgb, us_regions=(header,)))
    assert check(qc, QCCode.LOW_CONTRAST) is QCOutcome.WARN and not qc.failed


def test_thresholds_are_configurable(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    inst = instance(rgb)
    assert fired(assess_instance(inst)) == {}
    strict = QCThresholds(
        min_region_side_warn=1000,
        low_contrast_warn=255,
        saturated_level=60,
        saturated_warn=0.01,
        saturated_fail=1.0,
    )
    assert fired(assess_instance(inst, strict)) == {
        "low_resolution": "warn",
        "low_contrast": "warn",
        "saturated": "warn",
    }
    qc = assess_instance(inst, QCThresholds(min_region_fraction=0.9))
    assert check(qc, QCCode.NO_SCAN_REGION) is QCOutcome.FAIL and qc.failed
    qc = assess_instance(inst, QCThresholds(blank_level=200))
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL


def test_low_resolution(rng: np.random.Generator) -> None:
    small, _ = sector(rng, size=(480, 640), scale=0.25, ui=False)
    assert check(assess_instance(instance(small)), QCCode.LOW_RESOLUTION) is QCOutcome.FAIL
    mid, _ = sector(rng, size=(480, 640), scale=0.4, ui=False)
    assert check(assess_instance(instance(mid)), QCCode.LOW_RESOLUTION) is QCOutcome.WARN


def test_colour_doppler_flagged_but_tint_is_not(rng: np.random.Generator) -> None:
    rgb, mask = sector(rng)
    tinted = np.clip(rgb * np.array([1.0, 0.86, 0.66]), 0, 255).astype(np.uint8)
    assert check(assess_instance(instance(tinted)), QCCode.COLOUR_DOPPLER) is QCOutcome.PASS
    doppler = tinted.copy()
    box = np.zeros_like(mask)
    box[200:260, 290:350] = True
    doppler[box & mask] = (220, 30, 20)
    doppler[260:300, 300:340][mask[260:300, 300:340]] = (20, 60, 230)
    qc = assess_instance(instance(doppler))
    assert check(qc, QCCode.COLOUR_DOPPLER) is QCOutcome.WARN
    assert qc.colour_fraction > 0.005 and qc.usable_frames == (0,)
    # Flow colours over most of the region hide the B-mode: failed.
    flow = tinted.copy()
    pick = rng.random(mask.shape)
    flow[mask & (pick < 0.4)] = (230, 60, 20)
    flow[mask & (pick >= 0.4) & (pick < 0.75)] = (20, 90, 240)
    qc = assess_instance(instance(flow))
    assert check(qc, QCCode.COLOUR_DOPPLER) is QCOutcome.FAIL and qc.failed


def test_annotation_over_anatomy(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for x, y in ((260, 220), (380, 300)):  # calipers
        draw.line([(x - 6, y), (x + 6, y)], fill=(255, 255, 255))
        draw.line([(x, y - 6), (x, y + 6)], fill=(255, 255, 255))
    draw.text((280, 330), "LT KIDNEY", fill=(255, 255, 255))
    qc = assess_instance(instance(np.asarray(img)))
    assert check(qc, QCCode.ANNOTATION_OVER_ANATOMY) is QCOutcome.WARN
    assert qc.outcome is QCOutcome.WARN and not qc.failed


def _loop(rng: np.random.Generator, n: int) -> np.ndarray:
    base, _ = sector(rng)
    frames = []
    for i in range(n):
        f = base.copy()
        mask = base[..., 0] > 0
        noise = rng.integers(-12, 13, size=base.shape[:2])
        shifted = np.roll(base, i, axis=1)[..., 0].astype(int) + noise
        f[mask] = np.clip(shifted[mask], 1, 255)[:, None].astype(np.uint8)
        frames.append(f)
    return np.stack(frames)


def test_speckle_grain_follows_the_point_spread_not_the_gain() -> None:
    """A 1.6 times wider point spread (a coarser probe) raises the speckle grain drift
    monitors; brighter or darker images of the same probe leave it where it was."""
    def grain(**kwargs: object) -> float:
        frame, _ = sector(np.random.default_rng(4), **kwargs)  # type: ignore[arg-type]
        return assess_instance(instance(frame[None])).stats["speckle_grain"]

    usual = grain()
    assert 0.2 < usual < 0.95
    assert grain(blur=(0.8 * 1.6, 1.4 * 1.6)) > usual + 0.02
    for level in (60.0, 120.0):
        assert abs(grain(level=level) - usual) < 0.02


def test_moving_loop_passes_with_motion_stats(rng: np.random.Generator) -> None:
    qc = assess_instance(instance(_loop(rng, 6), frame_time_ms=40.0, number_of_frames=60))
    assert fired(qc) == {}, qc.checks
    assert qc.usable_frames == tuple(range(6))
    assert qc.stats["motion_mean"] > 1.0 and qc.stats["loop_seconds"] == pytest.approx(2.4)


def test_frozen_loop(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    qc = assess_instance(instance(np.stack([rgb] * 6), frame_time_ms=40.0, number_of_frames=30))
    assert check(qc, QCCode.FROZEN_LOOP) is QCOutcome.WARN
    assert qc.usable_frames == (0,)


def test_too_short_loop(rng: np.random.Generator) -> None:
    qc = assess_instance(instance(_loop(rng, 3), frame_time_ms=40.0))
    assert check(qc, QCCode.TOO_SHORT_LOOP) is QCOutcome.WARN


def test_failing_frame_excluded_from_loop(rng: np.random.Generator) -> None:
    frames = _loop(rng, 6)
    frames[2] = np.where(frames[2] > 0, 3, 0).astype(np.uint8)  # gain dropped to nothing
    qc = assess_instance(instance(frames, frame_time_ms=40.0, number_of_frames=60))
    assert check(qc, QCCode.BLANK) is QCOutcome.WARN
    assert qc.usable_frames == (0, 1, 3, 4, 5) and not qc.failed


@pytest.mark.parametrize("kind", ["curvilinear", "phased", "linear"])
def test_header_region_used_and_refined(rng: np.random.Generator, kind: str) -> None:
    rgb, mask = sector(rng, kind=kind)
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()),
        int(rows.min()),
        int(cols.max()),
        int(rows.max()),
        1,
        1,
        physical_delta_x=0.025,
        physical_delta_y=0.025,
        physical_units_x=3,
        physical_units_y=3,
    )
    region = find_scan_region(rgb, (header,))
    assert region is not None and iou(region.mask, mask) >= 0.95
    if kind == "linear":  # the header's rectangle is the image
        assert region.source is RegionSource.HEADER and region.shape is RegionShape.RECTANGLE
    else:
        assert region.source is RegionSource.HEADER_REFINED
        assert region.shape is RegionShape.SECTOR
    qc = assess_instance(instance(rgb, us_regions=(header,)))
    assert qc.stats["pixel_spacing_mm"] == pytest.approx(0.25)
    assert qc.stats["region_from_header"] == 1.0
    # Black below half the depth (lung under the pleura): the header gives the depth.
    dark = rgb.copy()
    half = (rows.min() + rows.max()) // 2
    dark[half:] = 0
    region = find_scan_region(dark, (header,))
    assert region is not None and iou(region.mask, mask) >= 0.9


def test_sector_geometry_fitted_without_header(rng: np.random.Generator) -> None:
    """Dark areas reaching the sector's edge do not cut into it (a convex hull's would)."""
    rgb, mask = sector(rng)
    shadowed = rgb.copy()
    rows, cols = np.nonzero(mask)
    mid = (rows.min() + rows.max()) // 2
    shadowed[mid:, : (cols.min() + cols.max()) // 2 - 40] = 0  # lower left quarter black
    region = find_scan_region(shadowed)
    assert region is not None and region.shape is RegionShape.SECTOR
    assert iou(region.mask, mask) >= 0.95


def test_frame_for_model(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    inst = instance(rgb)
    qc = assess_instance(inst)
    crop = frame_for_model(inst, qc, 0)
    assert qc.scan_region is not None and qc.scan_mask is not None
    c0, r0, c1, r1 = qc.scan_region
    assert crop.dtype == np.float32 and crop.shape == (r1 - r0, c1 - c0)
    assert (crop[~qc.scan_mask[r0:r1, c0:c1]] == 0).all() and 100 / 255 < crop.max() <= 1.0
    with pytest.raises(ValueError):
        frame_for_model(inst, qc, 1)


def test_assess_study(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    good = instance(rgb)
    ok = PreparedInstance(good, assess_instance(good))
    ct = instance(rgb, modality="CT")
    bad = PreparedInstance(ct, assess_instance(ct))
    assessable, checks = assess_study([ok, ok])
    assert assessable and all(c.outcome is QCOutcome.PASS for c in checks)
    assessable, checks = assess_study([ok, bad])
    codes = {c.code: c.outcome for c in checks}
    assert assessable and codes["too_few_usable_images"] is QCOutcome.WARN
    assessable, checks = assess_study([bad])
    codes = {c.code: c.outcome for c in checks}
    assert not assessable
    assert codes["not_ultrasound"] is QCOutcome.FAIL and codes["no_usable_image"] is QCOutcome.FAIL
    assert assess_study([])[0] is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"saturated_warn": 0.5, "saturated_fail": 0.1},
        {"low_contrast_warn": 10.0, "low_contrast_fail": 20.0},
        {"colour_warn": 0.5, "colour_fail": 0.1},
        {"min_region_side_warn": 100, "min_region_side_fail": 150},
        {"blank_fraction": 1.5},
        {"blank_level": -1},
    ],
)
def test_thresholds_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QCThresholds(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="SonoNet example images not available")
def test_real_screen_captures_pass() -> None:
    tifffile = pytest.importorskip("tifffile")
    files = sorted(EXAMPLES.glob("*.tiff"))
    assert files
    for path in files:
        rgb = np.asarray(tifffile.imread(path))[..., :3]
        qc = assess_instance(instance(rgb))
        assert fired(qc) == {}, (path.name, qc.checks)
        assert qc.scan_region is not None
        r0 = qc.scan_region[1]
        # The vendor's header bar (rows < 70) and side panels are left out.
        assert r0 >= 60 and qc.stats["region_fraction"] > 0.5


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="SonoNet example images not available")
@pytest.mark.parametrize("name", ["4CH.tiff", "KIDNEYS.tiff"])
def test_each_check_fires_on_real_screen_captures(name: str) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb = np.ascontiguousarray(np.asarray(tifffile.imread(EXAMPLES / name))[..., :3])
    good = assess_instance(instance(rgb))
    assert fired(good) == {} and good.scan_mask is not None
    mask = good.scan_mask
    rng = np.random.default_rng(7)
    values = rgb.astype(np.float32)

    def inside(new: np.ndarray, where: np.ndarray = mask) -> np.ndarray:
        out = rgb.copy()
        out[where] = np.clip(new, 0, 255).astype(np.uint8)[where]
        return out

    air = inside(np.repeat(3.0 * rng.rayleigh(1.0, mask.shape)[..., None], 3, axis=-1))
    qc = assess_instance(instance(air))
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL
    assert check(qc, QCCode.NO_SCAN_REGION) is QCOutcome.PASS
    # The other variants keep the region known (as a header's would): they test the check,
    # not the detector (a squeezed dynamic range also hides the texture it looks for).
    c0, r0, c1, r1 = good.scan_region or (0, 0, 0, 0)
    header = (UltrasoundRegion(c0, r0, c1 - 1, r1 - 1, spatial_format=1, data_type=1),)
    box = np.zeros_like(mask)
    box[r0:r1, c0:c1] = True
    qc = assess_instance(instance(inside(values * 3.0 + 60.0, box), us_regions=header))
    assert check(qc, QCCode.SATURATED) is QCOutcome.FAIL
    qc = assess_instance(instance(inside(110.0 + values * 0.08, box), us_regions=header))
    assert check(qc, QCCode.LOW_CONTRAST) is QCOutcome.FAIL
    cx, cy = (c0 + c1) // 2, (r0 + r1) // 2
    doppler = rgb.copy()
    patch = (slice(cy - 40, cy + 40), slice(cx - 50, cx + 50))
    doppler[patch][rng.random((80, 100)) < 0.6] = (200, 30, 30)
    qc = assess_instance(instance(doppler))
    assert check(qc, QCCode.COLOUR_DOPPLER) is QCOutcome.WARN
    img = Image.fromarray(rgb.copy())
    draw = ImageDraw.Draw(img)
    for x, y in ((cx - 80, cy), (cx + 80, cy + 40)):
        draw.line([(x - 8, y), (x + 8, y)], fill=(255, 255, 0))
        draw.line([(x, y - 8), (x, y + 8)], fill=(255, 255, 0))
    draw.text((cx - 60, cy + 80), "BPD 45.2 mm", fill=(255, 255, 255))
    qc = assess_instance(instance(np.asarray(img)))
    assert check(qc, QCCode.ANNOTATION_OVER_ANATOMY) is QCOutcome.WARN
    small = np.asarray(Image.fromarray(rgb).resize((160, 120)))
    qc = assess_instance(instance(small))
    assert check(qc, QCCode.LOW_RESOLUTION) is QCOutcome.FAIL
