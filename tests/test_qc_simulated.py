"""Scan region and QC over every simulated view and vendor style (workers/simulator).

The simulator's ground truth (scan mask, calipers shown) is the reference: the scan
region must match its mask with IoU >= 0.9, good frames must pass every check, and each
check must fire on a frame of every vendor style made to fail it.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dicom_sr.model import QCOutcome
from workers.imaging.qc import QCCode, assess_instance
from workers.imaging.scan_region import find_scan_region
from workers.imaging.types import DecodedInstance, InstanceQC, UltrasoundRegion

if TYPE_CHECKING:
    from simulator import SimFrame

simulator = pytest.importorskip("simulator")

VENDORS = sorted(simulator.VENDOR_STYLES)
CASES = [(view, vendor) for view in simulator.VIEWS for vendor in VENDORS]
MIN_IOU = 0.9


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)


def _instance(
    pixels: np.ndarray,
    regions: tuple[UltrasoundRegion, ...] = (),
    *,
    frame_time_ms: float | None = None,
) -> DecodedInstance:
    return DecodedInstance.from_pixels(pixels, us_regions=regions, frame_time_ms=frame_time_ms)


def _header(frame: SimFrame) -> tuple[UltrasoundRegion, ...]:
    """The Sequence of Ultrasound Regions the simulator's DICOM writer puts in the header."""
    c0, r0, c1, r1 = frame.scan_bbox
    return (UltrasoundRegion(c0, r0, c1 - 1, r1 - 1, spatial_format=1, data_type=1),)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _fired(qc: InstanceQC, frame: SimFrame | None = None) -> dict[str, str]:
    out = {c.code: c.outcome.value for c in qc.checks if c.outcome is not QCOutcome.PASS}
    if frame is not None and frame.acquisition.get("calipers_shown"):
        out.pop("annotation_over_anatomy", None)  # calipers over the anatomy: a true warning
    return out


def _outcome(qc: InstanceQC, code: QCCode) -> QCOutcome:
    (found,) = [c for c in qc.checks if c.code == code.value]
    return found.outcome


def _frame(view: str, vendor: str, salt: str = "", **kwargs: object) -> SimFrame:
    seed = zlib.crc32(f"{view}/{vendor}{salt}".encode())
    return simulator.simulate_image(
        view, vendor=vendor, rng=np.random.default_rng(seed), quality=0.95, **kwargs
    )


@pytest.mark.parametrize(("view", "vendor"), CASES)
def test_good_simulated_frame(view: str, vendor: str) -> None:
    """With the header's region (as the DICOM writer, and scanners, give it)."""
    frame = _frame(view, vendor)
    qc = assess_instance(_instance(frame.pixels, _header(frame)))
    assert qc.scan_mask is not None
    assert _iou(qc.scan_mask, frame.scan_mask) >= MIN_IOU
    assert _fired(qc, frame) == {}, qc.checks
    assert qc.usable_frames == (0,)


@pytest.mark.parametrize(("view", "vendor"), CASES)
def test_scan_region_without_header(view: str, vendor: str) -> None:
    """Image analysis alone (screen captures, secondary captures) finds the same region."""
    kwargs = {"lung_pattern": "b_lines"} if view == "lung" else {}
    frame = _frame(view, vendor, "/nohdr", **kwargs)
    qc = assess_instance(_instance(frame.pixels))
    assert qc.scan_mask is not None
    assert _iou(qc.scan_mask, frame.scan_mask) >= MIN_IOU
    assert _fired(qc, frame) == {}, qc.checks


@pytest.mark.parametrize("pattern", ["normal", "b_lines", "consolidation"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_lung_sector_through_black_pleura_and_shadows(vendor: str, pattern: str) -> None:
    """Lung is black below the pleura between A-lines and around a consolidation: the
    fitted sector spans those parts. With the header the depth is known and IoU >= 0.9
    always; without it the sector ends at the deepest echo, which a consolidation can
    leave far above the bottom, so only its precision is asserted then."""
    frame = _frame("lung", vendor, f"/{pattern}", lung_pattern=pattern)
    rgb = _rgb(frame.pixels)
    with_header = find_scan_region(rgb, _header(frame))
    assert with_header is not None and _iou(with_header.mask, frame.scan_mask) >= MIN_IOU
    alone = find_scan_region(rgb)
    assert alone is not None
    inside = (alone.mask & frame.scan_mask).sum() / alone.mask.sum()
    assert inside >= 0.97
    if pattern != "consolidation":
        assert _iou(alone.mask, frame.scan_mask) >= MIN_IOU


# ----------------------------------------------------------------------------------
# Each check fires on a frame of every vendor style made to fail it.
# ----------------------------------------------------------------------------------


def _probe_in_air(frame: SimFrame, rng: np.random.Generator) -> np.ndarray:
    """The vendor's screen with the probe in air: faint noise in the sector and a few
    reverberation bands below the probe face, fading with depth."""
    rgb = _rgb(frame.pixels).copy()
    mask = frame.scan_mask
    top = np.where(mask.any(axis=0), mask.argmax(axis=0), 0)[None, :]
    depth = (np.arange(mask.shape[0])[:, None] - top).astype(np.float32)
    period = 14.0
    k = np.round(depth / period)
    img = 3.0 * rng.rayleigh(1.0, mask.shape).astype(np.float32)
    img += 150.0 * np.exp(-k / 2.5) * np.exp(-0.5 * ((depth - k * period) / 1.5) ** 2)
    rgb[mask] = np.clip(img[mask], 0, 255).astype(np.uint8)[:, None]
    return rgb


def _inside(frame: SimFrame, values: np.ndarray) -> np.ndarray:
    rgb = _rgb(frame.pixels).copy()
    rgb[frame.scan_mask] = values[frame.scan_mask]
    return rgb


@pytest.mark.parametrize("vendor", VENDORS)
def test_each_check_fires_on_simulated_frames(vendor: str) -> None:
    rng = np.random.default_rng(zlib.crc32(vendor.encode()))
    frame = _frame("abdomen", vendor, "/checks")
    rgb = _rgb(frame.pixels).astype(np.float32)
    header = _header(frame)

    # Probe in air: blank (not "no scan region"), with or without the header.
    air = _probe_in_air(frame, rng)
    for regions in ((), header):
        qc = assess_instance(_instance(air, regions))
        assert _outcome(qc, QCCode.BLANK) is QCOutcome.FAIL and qc.failed
        assert _outcome(qc, QCCode.NO_SCAN_REGION) is QCOutcome.PASS
    # The UI alone (frozen black image) has no scan region: text is not taken for one.
    ui_only = _inside(frame, np.zeros_like(rgb, dtype=np.uint8))
    qc = assess_instance(_instance(ui_only))
    assert _outcome(qc, QCCode.NO_SCAN_REGION) is QCOutcome.FAIL and qc.scan_region is None

    # Gain far too high: saturated.
    bright = _inside(frame, np.clip(rgb * 3.0 + 60.0, 0, 255).astype(np.uint8))
    assert _outcome(assess_instance(_instance(bright, header)), QCCode.SATURATED) is (
        QCOutcome.FAIL
    )
    # Dynamic range squeezed: low contrast.
    flat = _inside(frame, (110.0 + rgb * 0.08).astype(np.uint8))
    qc = assess_instance(_instance(flat, header))
    assert _outcome(qc, QCCode.LOW_CONTRAST) is QCOutcome.FAIL
    assert _outcome(qc, QCCode.BLANK) is QCOutcome.PASS

    # A colour Doppler box over the anatomy: warned; colour over the whole image: failed.
    c0, r0, c1, r1 = frame.scan_bbox
    cx, cy = (c0 + c1) // 2, (r0 + r1) // 2
    doppler = _rgb(frame.pixels).copy()
    box = np.zeros_like(frame.scan_mask)
    box[cy - 30 : cy + 30, cx - 40 : cx + 40] = True
    doppler[box & frame.scan_mask & (rng.random(box.shape) < 0.6)] = (210, 40, 30)
    qc = assess_instance(_instance(doppler, header))
    assert _outcome(qc, QCCode.COLOUR_DOPPLER) is QCOutcome.WARN and not qc.failed
    flow = _rgb(frame.pixels).copy()
    towards = (rng.random(box.shape) < 0.45) & frame.scan_mask
    away = (rng.random(box.shape) < 0.45) & frame.scan_mask & ~towards
    flow[towards] = (220, 50, 20)
    flow[away] = (30, 80, 230)
    qc = assess_instance(_instance(flow, header))
    assert _outcome(qc, QCCode.COLOUR_DOPPLER) is QCOutcome.FAIL and qc.failed

    # Text and calipers burned into the anatomy: warned.
    img = Image.fromarray(_rgb(frame.pixels).copy())
    draw = ImageDraw.Draw(img)
    for x, y in ((cx - 50, cy - 20), (cx + 40, cy + 30)):
        draw.line([(x - 6, y), (x + 6, y)], fill=(255, 255, 255))
        draw.line([(x, y - 6), (x, y + 6)], fill=(255, 255, 255))
    draw.text((cx - 40, cy + 50), "LIVER 12.3 cm", fill=(255, 255, 255))
    qc = assess_instance(_instance(np.asarray(img), header))
    assert _outcome(qc, QCCode.ANNOTATION_OVER_ANATOMY) is QCOutcome.WARN and not qc.failed

    # A small capture of the same screen: low resolution.
    small = np.asarray(Image.fromarray(_rgb(frame.pixels)).resize((200, 150)))
    qc = assess_instance(_instance(small))
    assert _outcome(qc, QCCode.LOW_RESOLUTION) is QCOutcome.FAIL and qc.failed


@pytest.mark.parametrize("vendor", VENDORS)
def test_simulated_loops(vendor: str) -> None:
    seed = zlib.crc32(f"loop/{vendor}".encode())
    loop = simulator.simulate_loop(
        "cardiac_4ch", vendor=vendor, rng=np.random.default_rng(seed), n_frames=6, quality=0.95
    )
    frames = np.stack([_rgb(f.pixels) for f in loop])
    header = _header(loop[0])
    qc = assess_instance(_instance(frames, header, frame_time_ms=100.0))
    fired = _fired(qc, loop[0])
    assert fired == {}, qc.checks
    assert qc.usable_frames == tuple(range(6)) and qc.stats["motion_min"] > 1.0
    # A dropped frame (blank) is excluded and warned about; the motion skips it.
    dropped = frames.copy()
    dropped[3][loop[0].scan_mask] = 0
    qc = assess_instance(_instance(dropped, header, frame_time_ms=100.0))
    assert _outcome(qc, QCCode.BLANK) is QCOutcome.WARN and 3 not in qc.usable_frames
    assert qc.stats["excluded_frames"] == 1.0 and not qc.failed
    # Frozen and too short.
    frozen = np.stack([frames[0]] * 6)
    qc = assess_instance(_instance(frozen, header, frame_time_ms=100.0))
    assert _outcome(qc, QCCode.FROZEN_LOOP) is QCOutcome.WARN and qc.usable_frames == (0,)
    qc = assess_instance(_instance(frames[:2], header, frame_time_ms=20.0))
    assert _outcome(qc, QCCode.TOO_SHORT_LOOP) is QCOutcome.WARN
