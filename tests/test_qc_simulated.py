"""Scan region and QC over every simulated view and vendor style (workers/simulator)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from dicom_sr.model import QCOutcome
from workers.imaging import DecodedInstance, UltrasoundRegion
from workers.qc import assess_instance

simulator = pytest.importorskip("workers.simulator")

CASES = [(view, vendor) for view in simulator.VIEWS for vendor in simulator.VENDOR_STYLES]
#: Lung images can be black below the pleura (A-lines, shadows): without a header region
#: the black deep sector cannot be told from the background, so lung frames are given the
#: header's region, as the simulator's DICOM writer (and real scanners) provide it.
HEADER_VIEWS = {"lung"}
#: Known limitation (see the report): a lung sector that is black below the pleura is
#: still only partly recovered from its header rectangle.
MIN_IOU = {"lung": 0.7}


def _instance(pixels: np.ndarray, regions: tuple[UltrasoundRegion, ...] = ()) -> DecodedInstance:
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
    return DecodedInstance(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        modality="US",
        manufacturer="Sim",
        manufacturer_model_name="Sim",
        photometric_interpretation="RGB",
        number_of_frames=1,
        frame_indices=(0,),
        frames=rgb[None],
        us_regions=regions,
    )


@pytest.mark.parametrize(("view", "vendor"), CASES)
def test_good_simulated_frame(view: str, vendor: str) -> None:
    seed = zlib.crc32(f"{view}/{vendor}".encode())
    frame = simulator.simulate_image(
        view, vendor=vendor, rng=np.random.default_rng(seed), quality=0.95
    )
    regions: tuple[UltrasoundRegion, ...] = ()
    if view in HEADER_VIEWS:
        c0, r0, c1, r1 = frame.scan_bbox
        regions = (UltrasoundRegion(c0, r0, c1 - 1, r1 - 1, spatial_format=1, data_type=1),)
    qc = assess_instance(_instance(frame.pixels, regions))
    assert qc.scan_mask is not None
    truth = frame.scan_mask
    iou = (qc.scan_mask & truth).sum() / (qc.scan_mask | truth).sum()
    assert iou >= MIN_IOU.get(view, 0.9), iou
    fired = {c.code for c in qc.checks if c.outcome is not QCOutcome.PASS}
    if frame.acquisition.get("calipers_shown"):
        fired.discard("annotation_over_anatomy")  # calipers over the anatomy: a true warning
    assert fired == set(), qc.checks
    assert qc.usable_frames == (0,)
