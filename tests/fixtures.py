"""Small DICOM datasets built in tests (the simulator makes realistic ones)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_us_dataset(*, study_uid: str | None = None, sop_class: str = US_IMAGE,
                    modality: str = "US", rows: int = 64, cols: int = 64,
                    seed: int = 0) -> Dataset:
    """A minimal, valid single-frame grey image dataset."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Manufacturer = "Test Vendor"
    ds.ManufacturerModelName = "T1"
    ds.PatientID = "TEST-1"
    ds.PatientName = "Test^Patient"
    ds.StudyDate = "20261122"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 255, (rows, cols), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def require_tools(*tools: str) -> None:
    """Skip when a peer tool is missing; in CI (``CI=true``) fail instead, never hide it."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    message = (
        f"missing peer tools: {', '.join(missing)} "
        "(apt-get install dcmtk dicom3tools orthanc)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
