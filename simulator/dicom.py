"""DICOM encoding of simulated frames: US Image / US Multi-frame Image Storage instances.

:func:`build_instance` is a pure builder (frames in, dataset out); :func:`write_instance`
adds the file write. Compressed transfer syntaxes use pydicom's encoders
(``Dataset.compress``: RLE, JPEG-LS, JPEG 2000) except JPEG baseline, which pydicom
cannot encode and is done here with Pillow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from simulator.simulate import SimFrame
from simulator.vendors import get_vendor

logger = logging.getLogger(__name__)

US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
"""Ultrasound Image Storage."""
US_MULTIFRAME_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.3.1")
"""Ultrasound Multi-frame Image Storage."""
UID_ROOT = "2.25."


class Photometric(StrEnum):
    """Photometric interpretations the simulator writes."""

    MONOCHROME2 = "MONOCHROME2"
    """Grey, 0 is black."""
    RGB = "RGB"
    """Colour, interleaved R, G, B."""
    YBR_FULL_422 = "YBR_FULL_422"
    """Colour as JPEG-baseline YCbCr with 4:2:2 chroma subsampling (JPEG baseline only)."""


TRANSFER_SYNTAXES: dict[str, UID] = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-ls-near": JPEGLSNearLossless,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "jpeg": JPEGBaseline8Bit,
}
"""Supported transfer syntaxes by short name (UIDs are accepted too)."""

_LOSSY = {
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEGBaseline8Bit: "ISO_10918_1",
}
_NATIVE = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
}
_FRAME_TIME_TAG = 0x00181063
_IMAGE_TYPE_3 = {
    "abdomen": "ABDOMINAL",
    "thyroid_transverse": "THYROID",
    "thyroid_longitudinal": "THYROID",
    "cardiac_4ch": "TRANSTHORACIC",
    "lung": "CHEST",
}


def deterministic_uid(*parts: object) -> str:
    """A ``2.25.`` UID derived from ``parts`` by SHA-256 (same parts, same UID).

    ``pydicom.uid.generate_uid`` ignores its entropy sources under the ``2.25`` root,
    so the simulator derives its own to keep studies reproducible from a seed.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def resolve_transfer_syntax(value: str | None) -> UID:
    """Return the transfer syntax UID for a short name or UID (``None``: explicit VR LE).

    Raises
    ------
    ValueError
        If the value is neither a known name nor a supported UID.
    """
    if value is None:
        return ExplicitVRLittleEndian
    key = value.strip().lower()
    if key in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[key]
    for uid in TRANSFER_SYNTAXES.values():
        if uid == value.strip():
            return uid
    raise ValueError(
        f"unsupported transfer syntax {value!r}; use one of {sorted(TRANSFER_SYNTAXES)} "
        "or their UIDs"
    )


@dataclass(frozen=True)
class StudyContext:
    """Patient and study identity shared by all instances of a simulated study."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_id: str
    study_datetime: datetime
    station_name: str
    institution_name: str = "Simulated General Hospital"
    study_description: str = "US simulated study"


def new_study_context(
    rng: np.random.Generator,
    *,
    vendor: str,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
) -> StudyContext:
    """Draw a fictional patient and study (deterministic given ``rng``)."""
    style = get_vendor(vendor)
    given = ["ALEX", "SAM", "ROBIN", "JORDAN", "CASEY", "MORGAN", "RILEY", "TAYLOR"]
    family = ["SIMULATED", "PHANTOM", "TESTCASE", "SYNTHETIC", "MOCKUP"]
    key = int(rng.integers(1 << 62))
    uid = study_instance_uid or deterministic_uid("sononode-sim", "study", key)
    year = int(rng.integers(1940, 2005))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    when = datetime(
        2024,
        int(rng.integers(1, 13)),
        int(rng.integers(1, 29)),
        int(rng.integers(7, 19)),
        int(rng.integers(0, 60)),
        int(rng.integers(0, 60)),
    )
    return StudyContext(
        study_instance_uid=str(uid),
        patient_id=patient_id or f"SIM{key % 10**7:07d}",
        patient_name=f"{rng.choice(family)}^{rng.choice(given)}",
        patient_birth_date=f"{year:04d}{month:02d}{day:02d}",
        patient_sex=str(rng.choice(["F", "M", "O"], p=[0.5, 0.45, 0.05])),
        accession_number=f"A{key % 10**8:08d}",
        study_id=f"{key % 10**5:05d}",
        study_datetime=when,
        station_name=f"{style.station_prefix}{key % 100:02d}"[:16],
    )


def _as_photometric(frames: np.ndarray, photometric: Photometric) -> np.ndarray:
    """Convert ``(N, rows, cols[, 3])`` pixels to the requested sample layout."""
    colour = frames.ndim == 4
    if photometric is Photometric.MONOCHROME2:
        if colour:
            lum = frames @ np.array([0.299, 0.587, 0.114])
            return np.clip(np.round(lum), 0, 255).astype(np.uint8)
        return frames
    if not colour:
        return np.repeat(frames[..., None], 3, axis=-1)
    return frames


def _jpeg_baseline_frames(frames: np.ndarray, photometric: Photometric) -> list[bytes]:
    # pydicom 3 has no JPEG baseline encoder, so each frame is encoded with Pillow
    # (libjpeg) and encapsulated by hand. Colour goes out as YCbCr with 4:2:2 chroma
    # subsampling (Pillow subsampling=1), which is what YBR_FULL_422 declares.
    out = []
    for frame in frames:
        buf = io.BytesIO()
        if photometric is Photometric.MONOCHROME2:
            Image.fromarray(frame, "L").save(buf, "JPEG", quality=92)
        else:
            Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=92, subsampling=1)
        out.append(buf.getvalue())
    return out


def build_instance(
    frames: Sequence[SimFrame] | SimFrame,
    *,
    vendor: str,
    study: StudyContext,
    series_instance_uid: str,
    series_number: int = 1,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
) -> Dataset:
    """Build a US Image (one frame) or US Multi-frame Image (several) dataset.

    Parameters
    ----------
    frames
        One frame or a cine loop (all of the same shape).
    vendor
        Vendor style name; sets the equipment module.
    study
        Patient and study identity.
    series_instance_uid, series_number, instance_number
        Series membership and numbering.
    sop_instance_uid
        Instance UID (generated when ``None``).
    transfer_syntax
        Name (see :data:`TRANSFER_SYNTAXES`) or UID; ``None`` is explicit VR little endian.
    photometric
        ``MONOCHROME2``, ``RGB`` or ``YBR_FULL_422`` (JPEG baseline only). ``None``:
        MONOCHROME2 for grey frames, RGB for colour (YBR_FULL_422 under JPEG baseline).

    Returns
    -------
    pydicom.dataset.Dataset
        The dataset with file meta, encoded in ``transfer_syntax``.

    Raises
    ------
    ValueError
        For no frames, frames of different shapes, an unsupported transfer syntax or
        photometric interpretation, or a combination DICOM does not allow.
    """
    seq = [frames] if isinstance(frames, SimFrame) else list(frames)
    if not seq:
        raise ValueError("no frames to encode")
    shape = seq[0].pixels.shape
    if any(f.pixels.shape != shape for f in seq):
        raise ValueError("all frames of an instance must have the same shape")
    tsyntax = resolve_transfer_syntax(transfer_syntax)
    colour_in = len(shape) == 3
    if photometric is None:
        if colour_in:
            pm = Photometric.YBR_FULL_422 if tsyntax == JPEGBaseline8Bit else Photometric.RGB
        else:
            pm = Photometric.MONOCHROME2
    else:
        try:
            pm = Photometric(photometric.strip().upper())
        except ValueError:
            raise ValueError(
                f"unsupported photometric {photometric!r}; use one of "
                f"{[p.value for p in Photometric]}"
            ) from None
    if pm is Photometric.YBR_FULL_422 and tsyntax != JPEGBaseline8Bit:
        raise ValueError("YBR_FULL_422 is only written with JPEG baseline (1.2.840.10008.1.2.4.50)")
    if pm is Photometric.RGB and tsyntax == JPEGBaseline8Bit:
        raise ValueError("JPEG baseline colour must be YBR_FULL_422, not RGB")

    style = get_vendor(vendor)
    first = seq[0]
    multi = len(seq) > 1
    pixels = _as_photometric(np.stack([f.pixels for f in seq]), pm)
    rows, cols = pixels.shape[1:3]
    sop_uid = sop_instance_uid or generate_uid()
    sop_class = US_MULTIFRAME_IMAGE_STORAGE if multi else US_IMAGE_STORAGE
    when = study.study_datetime
    view = str(first.labels.get("view"))

    ds = Dataset()
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientIdentityRemoved = "NO"
    # General study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    # General series
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = "Cine" if multi else "Images"
    ds.BodyPartExamined = {
        "abdomen": "ABDOMEN",
        "thyroid_transverse": "THYROID",
        "thyroid_longitudinal": "THYROID",
        "cardiac_4ch": "HEART",
        "lung": "CHEST",
    }.get(view, "")
    # General equipment
    ds.Manufacturer = style.name
    ds.ManufacturerModelName = style.model_name
    ds.SoftwareVersions = style.software_version
    ds.StationName = study.station_name
    ds.InstitutionName = study.institution_name
    ds.DeviceSerialNumber = f"{zlib.crc32(style.name.encode()) % 10**6:06d}"
    # General image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    burned = bool(first.acquisition.get("burned_in_annotation", True))
    ds.BurnedInAnnotation = "YES" if burned else "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", _IMAGE_TYPE_3.get(view, ""), "0001"]
    # Image pixel / US image
    ds.SamplesPerPixel = 1 if pm is Photometric.MONOCHROME2 else 3
    ds.PhotometricInterpretation = pm.value
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.TransducerType = {
        "curvilinear": "CURVED LINEAR",
        "linear": "LINEAR",
        "phased": "SECTOR_PHASED",
    }.get(str(first.acquisition.get("probe")), "")
    ds.TransducerData = [str(first.acquisition.get("probe", ""))]
    ds.ProcessingFunction = view
    ds.DepthOfScanField = round(float(first.acquisition.get("depth_mm", 0.0)))
    # Ultrasound region calibration: the scan region with its physical pixel size.
    c0, r0, c1, r1 = first.scan_bbox
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = c0
    region.RegionLocationMinY0 = r0
    region.RegionLocationMaxX1 = c1 - 1
    region.RegionLocationMaxY1 = r1 - 1
    ref = first.acquisition.get("reference_pixel", (0.0, 0.0))
    region.ReferencePixelX0 = round(float(ref[0])) - c0
    region.ReferencePixelY0 = round(float(ref[1])) - r0
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.ReferencePixelPhysicalValueX = 0.0
    region.ReferencePixelPhysicalValueY = 0.0
    region.PhysicalDeltaX = first.spacing_mm / 10.0
    region.PhysicalDeltaY = first.spacing_mm / 10.0
    region.TransducerFrequency = round(float(first.acquisition.get("frequency_mhz", 0)) * 1000)
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    if multi:
        rate = float(first.acquisition.get("frame_rate_hz", 25.0))
        ds.NumberOfFrames = len(seq)
        ds.FrameIncrementPointer = _FRAME_TIME_TAG
        ds.FrameTime = round(1000.0 / rate, 3)
        ds.CineRate = round(rate)
        ds.RecommendedDisplayFrameRate = round(rate)
        ds.EffectiveDuration = round(len(seq) / rate, 3)
        ds.ActualFrameDuration = round(1000.0 / rate)
        ds.StartTrim = 1
        ds.StopTrim = len(seq)
        if view == "cardiac_4ch":
            ds.HeartRate = 72
    else:
        ds.NumberOfFrames = None
        del ds.NumberOfFrames

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SONONODE_SIM"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta

    arr = pixels if multi else pixels[0]
    if tsyntax in _NATIVE:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = tsyntax
    elif tsyntax == JPEGBaseline8Bit:
        ds.PixelData = encapsulate(_jpeg_baseline_frames(pixels, pm))
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = tsyntax
    else:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds["PixelData"].VR = "OB"
        kwargs: dict[str, Any] = {}
        if tsyntax == JPEGLSNearLossless:
            kwargs["jls_error"] = 2
        if tsyntax == JPEG2000:
            kwargs["j2k_psnr"] = [42.0]
        if tsyntax in (JPEG2000, JPEG2000Lossless) and ds.SamplesPerPixel == 3:
            # Colour JPEG 2000 must use the multiple-component transform and declare it
            # (PS3.5 8.2.4); decoders hand back RGB.
            ds.PhotometricInterpretation = "YBR_RCT" if tsyntax == JPEG2000Lossless else "YBR_ICT"
        try:
            ds.compress(tsyntax, arr, generate_instance_uid=False, **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"could not encode pixel data as {tsyntax.name}: {exc}") from exc
    if tsyntax in _LOSSY:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY[tsyntax]
        raw = pixels.nbytes
        enc = len(ds.PixelData)
        ds.LossyImageCompressionRatio = f"{raw / max(enc, 1):.2f}"[:16]
    return ds


def write_instance(
    frames: Sequence[SimFrame] | SimFrame,
    path: Path,
    *,
    vendor: str,
    study: StudyContext,
    series_instance_uid: str,
    series_number: int = 1,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
) -> Dataset:
    """Build an instance (see :func:`build_instance`) and write it as a DICOM file.

    Returns
    -------
    pydicom.dataset.Dataset
        The dataset written.
    """
    ds = build_instance(
        frames,
        vendor=vendor,
        study=study,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        photometric=photometric,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tsyntax = ds.file_meta.TransferSyntaxUID
    little = tsyntax != ExplicitVRBigEndian
    implicit = tsyntax == ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=little)
    logger.debug("wrote %s (%s)", path, tsyntax.name)
    return ds


__all__ = [
    "TRANSFER_SYNTAXES",
    "US_IMAGE_STORAGE",
    "US_MULTIFRAME_IMAGE_STORAGE",
    "Photometric",
    "StudyContext",
    "build_instance",
    "deterministic_uid",
    "new_study_context",
    "resolve_transfer_syntax",
    "write_instance",
]
