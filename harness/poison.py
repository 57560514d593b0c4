"""Malformed instances as real peers send them: each a small change to a valid dataset.

Every poison is a function from a valid single-frame or multi-frame ultrasound dataset to
a copy that is broken in one way vendors' and archives' files are broken in practice (a
wrong VR, a multi-valued UID, pixel data that does not match its header, ...). The tests
and the fuzz benchmark send them to the node: each must be refused with a failure status
or, once accepted, reported as not assessable while the rest of its study is analysed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import JPEGBaseline8Bit, generate_uid

Poison = Callable[[Dataset], Dataset]


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Set an element's encoded bytes as they are (pydicom would refuse or convert them)."""
    if len(value) % 2:
        value += b" "
    ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _copy(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    # A poisoned copy is a new instance: the valid original may be in the same study.
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def bits_allocated_wrong_vr(ds: Dataset) -> Dataset:
    """Bits Allocated written as a string (VR LO) instead of US."""
    out = _copy(ds)
    _raw(out, 0x00280100, "LO", str(ds.BitsAllocated).encode())
    return out


def series_uid_multivalued(ds: Dataset) -> Dataset:
    """Two Series Instance UIDs (VM 2) where the standard allows one."""
    out = _copy(ds)
    out[0x0020000E] = DataElement(0x0020000E, "UI", [str(ds.SeriesInstanceUID), generate_uid()])
    return out


def pixel_data_short(ds: Dataset) -> Dataset:
    """Pixel Data holding half the bytes Rows x Columns x Samples x Frames call for."""
    out = _copy(ds)
    data = bytes(ds.PixelData)
    out.PixelData = data[: len(data) // 2 // 2 * 2]
    return out


def rows_zero(ds: Dataset) -> Dataset:
    """An image of zero rows."""
    out = _copy(ds)
    out.Rows = 0
    return out


def photometric_unknown(ds: Dataset) -> Dataset:
    """A Photometric Interpretation no standard defines."""
    out = _copy(ds)
    out.PhotometricInterpretation = "XYZ"
    return out


def frames_overstated(ds: Dataset) -> Dataset:
    """Number of Frames 1000 over the pixel data of one frame."""
    out = _copy(ds)
    out.NumberOfFrames = 1000
    return out


def samples_per_pixel_seven(ds: Dataset) -> Dataset:
    """Seven samples per pixel."""
    out = _copy(ds)
    out.SamplesPerPixel = 7
    return out


def bits_stored_above_allocated(ds: Dataset) -> Dataset:
    """Bits Stored 16 in 8 allocated bits."""
    out = _copy(ds)
    out.BitsStored = 16
    out.HighBit = 15
    return out


def transfer_syntax_lie(ds: Dataset) -> Dataset:
    """Native pixel data declared as JPEG Baseline: one fragment that is not a JPEG stream."""
    out = _copy(ds)
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out.PixelData = encapsulate([bytes(ds.PixelData)[:65536]])
    out["PixelData"].VR = "OB"
    return out


def frame_time_garbage(ds: Dataset) -> Dataset:
    """A Frame Time that is not a number."""
    out = _copy(ds)
    _raw(out, 0x00181063, "DS", b"fast")
    return out


def ultrasound_regions_inverted(ds: Dataset) -> Dataset:
    """A Sequence of Ultrasound Regions whose region ends before it starts."""
    out = _copy(ds)
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = int(ds.Columns) - 1
    region.RegionLocationMinY0 = int(ds.Rows) - 1
    region.RegionLocationMaxX1 = 0
    region.RegionLocationMaxY1 = 0
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = -0.01
    region.PhysicalDeltaY = 0.0
    out.SequenceOfUltrasoundRegions = Sequence([region])
    return out


def dimensions_huge(ds: Dataset) -> Dataset:
    """Rows and Columns of 65535 over a small pixel data value."""
    out = _copy(ds)
    out.Rows = 65535
    out.Columns = 65535
    return out


def patient_name_bad_bytes(ds: Dataset) -> Dataset:
    """A Patient's Name whose bytes are not valid in the declared character set."""
    out = _copy(ds)
    out.SpecificCharacterSet = "ISO_IR 192"
    _raw(out, 0x00100010, "PN", b"Poison^\xff\xfe\xfd")
    return out


def study_date_garbage(ds: Dataset) -> Dataset:
    """A Study Date of fourteen digits (DA is YYYYMMDD)."""
    out = _copy(ds)
    _raw(out, 0x00080020, "DA", b"99999999999999")
    return out


def patient_sex_invalid(ds: Dataset) -> Dataset:
    """A Patient's Sex that is none of M, F, O."""
    out = _copy(ds)
    out.PatientSex = "X"
    return out


def character_set_unknown(ds: Dataset) -> Dataset:
    """A Specific Character Set no standard defines."""
    out = _copy(ds)
    _raw(out, 0x00080005, "CS", b"ISO_IR 999")
    return out


def manufacturer_wrong_vr(ds: Dataset) -> Dataset:
    """Manufacturer encoded as a double (VR FD) of a length no double has."""
    out = _copy(ds)
    _raw(out, 0x00080070, "FD", b"12\\34")
    return out


def planar_configuration_invalid(ds: Dataset) -> Dataset:
    """Planar Configuration 7 (only 0 and 1 exist)."""
    out = _copy(ds)
    out.PlanarConfiguration = 7
    return out


#: Every poison by name.
POISONS: dict[str, Poison] = {
    poison.__name__: poison
    for poison in (
        bits_allocated_wrong_vr,
        series_uid_multivalued,
        pixel_data_short,
        rows_zero,
        photometric_unknown,
        frames_overstated,
        samples_per_pixel_seven,
        bits_stored_above_allocated,
        transfer_syntax_lie,
        frame_time_garbage,
        ultrasound_regions_inverted,
        dimensions_huge,
        patient_name_bad_bytes,
        planar_configuration_invalid,
        study_date_garbage,
        patient_sex_invalid,
        character_set_unknown,
        manufacturer_wrong_vr,
    )
}


def write_poisoned(ds: Dataset, name: str, folder: Path) -> Path:
    """Write the poison ``name`` of ``ds`` as a Part-10 file in ``folder``."""
    poisoned = POISONS[name](ds)
    path = folder / f"{name}.dcm"
    poisoned.save_as(path, enforce_file_format=True)
    return path
