"""Small DICOM datasets built in tests (the simulator makes realistic ones), and the
checks that a peer the tests need is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.db import Database, Job, JobState, Study, StudyState
from node.index import InstanceMeta, register_instance

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


def make_job(db: Database, state: JobState, *, study_uid: str) -> int:
    """A study of one indexed instance, processing, with one job in ``state``: its id."""
    ds = make_us_dataset(study_uid=study_uid)
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"), path="a.dcm",
                      size_bytes=10, calling_ae_title="US1")
    with db.session() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        study.state = StudyState.PROCESSING
        job = Job(study_instance_uid=study_uid, revision=1, state=state)
        session.add(job)
        session.flush()
        return job.id


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def skip_or_fail(message: str) -> None:
    """Skip when a peer is missing; in CI (``CI=true``) fail instead, never hide it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_tools(*tools: str) -> None:
    """Skip (locally) or fail (in CI) when a peer tool is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"missing peer tools: {', '.join(missing)} "
                     "(apt-get install dcmtk dicom3tools orthanc)")


def require_npm_packages(folder: Path, *, marker: str = "") -> None:
    """The npm packages of a test harness in ``folder``, installed from its lock file on
    first use; skip (locally) or fail (in CI) without Node.js or when that fails.

    ``marker`` names a package that must be there (default: any ``node_modules``)."""
    modules = folder / "node_modules"
    if shutil.which("node") and shutil.which("npm") and not modules.is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=folder, capture_output=True, timeout=600, check=False)
    if shutil.which("node") is None or not (modules / marker).is_dir():
        skip_or_fail(f"the npm packages of {folder.name} are not installed: Node.js 20 "
                     f"and 'npm ci --prefix {folder}'")
