"""Quality control and scan-region detection on synthetic and real frames (workers/qc.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from dicom_sr.model import QCOutcome
from workers.imaging import DecodedInstance, InstanceQC, PreparedInstance, UltrasoundRegion
from workers.qc import QCCode, QCThresholds, assess_instance, assess_study, frame_for_model
from workers.scan_region import RegionSource, find_scan_region

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
    speckle = ndimage.gaussian_filter(speckle, (0.8, 1.4))
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
    if frames.ndim == 3:
        frames = frames[None]
    n = frames.shape[0]
    return DecodedInstance(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        modality=modality,
        manufacturer="Test",
        manufacturer_model_name="T1",
        photometric_interpretation="RGB",
        number_of_frames=number_of_frames or n,
        frame_indices=tuple(range(n)),
        frames=frames,
        us_regions=us_regions,
        frame_time_ms=frame_time_ms,
    )


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
    qc = assess_instance(instance(rgb))
    codes = {c.code for c in qc.checks}
    assert {q.value for q in (QCCode.NOT_US, QCCode.BLANK, QCCode.SATURATED)} <= codes
    sat = next(c for c in qc.checks if c.code == "saturated")
    assert sat.value is not None and sat.threshold is not None


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


def test_blank_probe_in_air(rng: np.random.Generator) -> None:
    rgb, mask = sector(rng, level=4.0, ui=False)
    qc = assess_instance(instance(rgb))
    # Without a header the faint sector may not even be found: failed either way.
    assert qc.failed and set(fired(qc)) & {"blank", "no_scan_region"}
    # The header's region gives the rectangle even when the image is nearly empty.
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), 1, 1
    )
    qc = assess_instance(instance(np.zeros_like(rgb), us_regions=(header,)))
    assert check(qc, QCCode.BLANK) is QCOutcome.FAIL


def test_saturated(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng, level=240.0)
    qc = assess_instance(instance(rgb))
    assert check(qc, QCCode.SATURATED) is QCOutcome.FAIL and qc.failed


def test_low_contrast(rng: np.random.Generator) -> None:
    rgb, mask = sector(rng, level=120.0, spread=0.15, anechoic=False)
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), 1, 1
    )
    qc = assess_instance(instance(rgb, us_regions=(header,)))
    assert check(qc, QCCode.LOW_CONTRAST) is QCOutcome.FAIL
    assert check(qc, QCCode.BLANK) is QCOutcome.PASS


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


def test_header_region_used_and_refined(rng: np.random.Generator) -> None:
    rgb, mask = sector(rng)
    rows, cols = np.nonzero(mask)
    header = UltrasoundRegion(
        int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()), 1, 1
    )
    region = find_scan_region(rgb, (header,))
    assert region is not None and region.source is RegionSource.HEADER_REFINED
    assert iou(region.mask, mask) >= 0.9


def test_frame_for_model(rng: np.random.Generator) -> None:
    rgb, _ = sector(rng)
    inst = instance(rgb)
    qc = assess_instance(inst)
    crop = frame_for_model(inst, qc, 0)
    assert qc.scan_region is not None and qc.scan_mask is not None
    c0, r0, c1, r1 = qc.scan_region
    assert crop.dtype == np.float32 and crop.shape == (r1 - r0, c1 - c0)
    assert (crop[~qc.scan_mask[r0:r1, c0:c1]] == 0).all() and crop.max() > 100
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


def test_thresholds_validated() -> None:
    with pytest.raises(ValueError):
        QCThresholds(saturated_warn=0.5, saturated_fail=0.1)
    with pytest.raises(ValueError):
        QCThresholds(blank_mean=-1)


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
