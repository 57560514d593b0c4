"""A worker process's warm-up: one synthetic study through every stage, in memory.

The first study a fresh worker process handles used to be its slow one (1.0-1.7 s from
the stable moment to the SR in the PACS, against 0.7 s for the next ones): pixel
decoding, QC's filters, the first forward pass of each network and highdicom's SR
classes all fill caches and dictionaries on first use, and the first study's
allocations set off full garbage collections that walk every object the loaded packs
and libraries hold. :func:`warm_up` runs a two-instance study (a still and a short loop)
through decoding, QC, the models and the SR builder before the process takes its first
task, and :func:`freeze_long_lived` then hands the survivors to the interpreter's
permanent generation.

The study is made here, not by the simulator (serving code never imports it): a sector
of speckle on black, enough for QC to find a scan region and pass the frames on. Nothing
of it is written, indexed, exported or counted in the metrics.
"""

from __future__ import annotations

import gc
import io
import time
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicom_sr.builder import build_sr
from dicom_sr.builder import warm_up as warm_up_sr
from node.sop_classes import SOPClass
from workers.imaging.pixels import decode_dataset
from workers.imaging.qc import assess_instance, assess_study
from workers.imaging.types import PreparedInstance

if TYPE_CHECKING:
    from workers.models.inference import Analyser


def sector_frames(n: int, *, rows: int = 480, cols: int = 640, seed: int = 0) -> np.ndarray:
    """``n`` RGB frames of a curved-array sector filled with speckle, black around it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    radius = np.hypot(x - cols / 2, y + 40)
    angle = np.arctan2(x - cols / 2, y + 40)
    sector = (radius > 80) & (radius < rows - 20) & (np.abs(angle) < 0.6)
    frames = np.zeros((n, rows, cols, 3), dtype=np.uint8)
    for i in range(n):
        speckle = ndimage.gaussian_filter(
            rng.rayleigh(1.0, (rows, cols)).astype(np.float32), (1.5, 0.8))
        grey = np.clip(40 + 60 * speckle * np.exp(-radius / 900), 0, 255)
        frames[i] = np.where(sector, grey, 0).astype(np.uint8)[..., None]
    return frames


def synthetic_instance(frames: np.ndarray, study_uid: str) -> Dataset:
    """An uncompressed RGB ultrasound instance of ``frames``, with no patient in it."""
    n, rows, cols = frames.shape[:3]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SOPClass.US_MULTIFRAME.value if n > 1 else SOPClass.US_IMAGE.value
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "sononode warm-up"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    if n > 1:
        ds.NumberOfFrames = n
        ds.FrameTime = 40.0
    ds.PixelData = frames.tobytes()
    return ds


def warm_up(analyser: Analyser | None, *, max_frames: int = 16) -> float:
    """Decode, assess, analyse (with ``analyser``, when this process runs inference) and
    report one synthetic study, and discard everything; the seconds it took.

    Raises whatever a stage raises: the caller logs it, and the process goes on cold.
    """
    started = time.perf_counter()
    study_uid = generate_uid()
    datasets = [synthetic_instance(sector_frames(1, seed=1), study_uid),
                synthetic_instance(sector_frames(4, seed=2), study_uid)]
    prepared = []
    for ds in datasets:
        decoded = decode_dataset(ds, max_frames=max_frames)
        prepared.append(PreparedInstance(decoded, assess_instance(decoded)))
    assessable, checks = assess_study(prepared)
    if analyser is None:
        warm_up_sr()  # no result to report without the models: highdicom's classes only
    else:
        result = analyser.analyse_study(study_uid, prepared, assessable=assessable,
                                        study_checks=checks)
        sr = build_sr(datasets, result, series_instance_uid=generate_uid(),
                      sop_instance_uid=generate_uid())
        sr.save_as(io.BytesIO(), enforce_file_format=True)
    return time.perf_counter() - started


def freeze_long_lived() -> int:
    """Collect, then move every object alive now to the permanent generation, which the
    garbage collector never walks again; the number of objects frozen.

    Called once the process holds what it keeps for its lifetime: the packs, torch,
    pydicom's and highdicom's dictionaries, about 500,000 objects whose full collection
    takes some 190 ms here, on the path of the first study.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
