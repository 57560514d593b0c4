"""Decoding of DICOM pixel data into 8-bit RGB frames (workers/imaging/pixels.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from workers.imaging.pixels import (
    PixelDataError,
    PixelErrorReason,
    load_instance,
    sample_frame_indices,
)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _dataset(sop_class: str = US_IMAGE) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "Test"
    return ds


def _image(arr: np.ndarray, pi: str, bits: int = 8) -> Dataset:
    multi = arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] != 3)
    ds = _dataset(US_MULTIFRAME if multi else US_IMAGE)
    ds.set_pixel_data(arr, pi, bits)
    return ds


def _save(ds: Dataset, tmp_path: Path, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _colour_pattern(rows: int = 32, cols: int = 48) -> np.ndarray:
    rgb = np.zeros((rows, cols, 3), np.uint8)
    rgb[: rows // 2, :, 0] = 200
    rgb[rows // 2 :, :, 2] = 180
    rgb[:, cols // 2 :, 1] = 120
    rgb[4:8, 4:8] = (255, 255, 255)
    return rgb


def test_sample_frame_indices_even_first_last() -> None:
    assert sample_frame_indices(5, 16) == (0, 1, 2, 3, 4)
    picks = sample_frame_indices(100, 8)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 99
    assert (np.diff(picks) > 0).all()
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_monochrome2_8bit_replicated_to_rgb(tmp_path: Path) -> None:
    grey = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48).astype(np.uint8)
    inst = load_instance(_save(_image(grey, "MONOCHROME2"), tmp_path))
    assert inst.frames.shape == (1, 32, 48, 3) and inst.frames.dtype == np.uint8
    assert np.array_equal(inst.frames[0, ..., 1], grey)
    assert inst.frame_indices == (0,) and inst.number_of_frames == 1
    assert inst.modality == "US" and inst.photometric_interpretation == "MONOCHROME2"


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    grey = np.full((16, 16), 10, np.uint8)
    grey[:8] = 250
    inst = load_instance(_save(_image(grey, "MONOCHROME1"), tmp_path))
    assert inst.frames[0, 0, 0, 0] == 5 and inst.frames[0, 15, 0, 2] == 245


def _planar(frames: np.ndarray, dtype: str) -> bytes:
    """Colour-by-plane (Planar Configuration 1) bytes of ``(N, rows, cols, 3)`` frames."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2)).astype(dtype).tobytes()


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configurations_and_depths(tmp_path: Path, planar: int, bits: int) -> None:
    rgb = np.stack([_colour_pattern(), _colour_pattern()[::-1].copy()])  # two frames
    stored = rgb.astype(np.uint16) * 257 if bits == 16 else rgb
    ds = _image(stored, "RGB", bits=bits)
    if planar == 1:
        ds.PlanarConfiguration = 1
        ds.PixelData = _planar(stored, "<u2" if bits == 16 else "u1")
    inst = load_instance(_save(ds, tmp_path))
    assert inst.frames.shape == (2, 32, 48, 3) and inst.frames.dtype == np.uint8
    assert np.array_equal(inst.frames, rgb)


@pytest.mark.parametrize("planar", [0, 1])
def test_ybr_full_native_converted_to_rgb(tmp_path: Path, planar: int) -> None:
    rgb = _colour_pattern()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _image(ybr, "YBR_FULL")
    if planar == 1:
        ds.PlanarConfiguration = 1
        ds.PixelData = _planar(ybr[None], "u1")
    inst = load_instance(_save(ds, tmp_path))
    assert inst.photometric_interpretation == "YBR_FULL"
    assert np.abs(inst.frames[0].astype(int) - rgb).max() <= 2


def test_ybr_full_422_native_converted_to_rgb(tmp_path: Path) -> None:
    """Uncompressed YBR_FULL_422: Y0 Y1 Cb Cr for each pair of pixels (PS3.3 C.7.6.3.1.2)."""
    rgb = np.repeat(_colour_pattern(), 2, axis=1)  # colour constant over pixel pairs
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    pairs = np.empty((ybr.shape[0], ybr.shape[1] // 2, 4), np.uint8)
    pairs[..., 0], pairs[..., 1] = ybr[:, 0::2, 0], ybr[:, 1::2, 0]
    pairs[..., 2], pairs[..., 3] = ybr[:, 0::2, 1], ybr[:, 0::2, 2]
    ds = _image(ybr, "YBR_FULL")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = pairs.tobytes()
    inst = load_instance(_save(ds, tmp_path))
    assert inst.frames.shape == (1, *rgb.shape)
    assert np.abs(inst.frames[0].astype(int) - rgb).max() <= 2


def test_palette_colour_16bit_lut(tmp_path: Path) -> None:
    idx = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    ds = _image(idx, "MONOCHROME2")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16) * 257
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp // 2)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    inst = load_instance(_save(ds, tmp_path))
    px = inst.frames[0, 0]
    assert tuple(px[0]) == (0, 255, 0)
    assert tuple(px[255]) == (255, 0, 127)
    assert tuple(px[100]) == (100, 155, 50)


def test_palette_colour_8bit_lut(tmp_path: Path) -> None:
    idx = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    ds = _image(idx, "MONOCHROME2")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16)
    for colour, lut in (("Red", ramp), ("Green", 255 - ramp), ("Blue", ramp // 2)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    inst = load_instance(_save(ds, tmp_path))
    px = inst.frames[0, 0]
    assert tuple(px[0]) == (0, 255, 0) and tuple(px[255]) == (255, 0, 127)
    assert tuple(px[100]) == (100, 155, 50)


def test_palette_colour_16bit_indices(tmp_path: Path) -> None:
    idx = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))
    ds = _image(idx, "MONOCHROME2", bits=16)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = (np.arange(4096) * 16).astype(np.uint16)
    for colour, lut in (("Red", ramp), ("Green", 65535 - ramp), ("Blue", ramp // 2)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4096, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    inst = load_instance(_save(ds, tmp_path))
    assert inst.frames.shape == (1, 8, 256, 3)
    px = inst.frames[0, 0].astype(int)
    assert tuple(px[0]) == (0, 255, 0)
    assert np.abs(px[128] - (128, 127, 64)).max() <= 1
    assert np.abs(px[255] - (255, 0, 127)).max() <= 1


def test_16bit_min_max_scaled(tmp_path: Path) -> None:
    grey = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    ds = _image(grey, "MONOCHROME2", bits=12)
    inst = load_instance(_save(ds, tmp_path))
    assert inst.frames.dtype == np.uint8
    assert inst.frames.min() == 0 and inst.frames.max() == 255


def test_16bit_window_applied(tmp_path: Path) -> None:
    grey = np.zeros((8, 8), np.uint16)
    grey[:, 2] = 900  # below the window
    grey[:, 4] = 1000  # its centre
    grey[:, 6] = 1200  # above it
    ds = _image(grey, "MONOCHROME2", bits=12)
    ds.WindowCenter = 1000
    ds.WindowWidth = 100
    inst = load_instance(_save(ds, tmp_path))
    row = inst.frames[0, 0, :, 0]
    assert row[2] == 0 and row[6] == 255 and 120 <= row[4] <= 135


def test_multiframe_sampled_with_regions_and_frame_time(tmp_path: Path) -> None:
    frames = np.stack([np.full((16, 20), i * 5, np.uint8) for i in range(40)])
    ds = _image(frames, "MONOCHROME2")
    ds.FrameTime = 33.3
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionLocationMinX0 = 2
    region.RegionLocationMinY0 = 3
    region.RegionLocationMaxX1 = 17
    region.RegionLocationMaxY1 = 14
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.01
    region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    inst = load_instance(_save(ds, tmp_path), max_frames=8)
    assert inst.number_of_frames == 40 and len(inst.frame_indices) == 8
    assert inst.frames.shape == (8, 16, 20, 3)
    for k, i in enumerate(inst.frame_indices):
        assert inst.frames[k, 0, 0, 0] == i * 5
    assert inst.frame_time_ms == pytest.approx(33.3)
    (reg,) = inst.us_regions
    assert (reg.min_x0, reg.min_y0, reg.max_x1, reg.max_y1) == (2, 3, 17, 14)
    assert reg.spatial_format == 1 and reg.physical_delta_x == pytest.approx(0.01)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_rgb_colours(tmp_path: Path, syntax: str) -> None:
    rgb = np.repeat(np.repeat(_colour_pattern(), 2, axis=0), 2, axis=1)
    ds = _image(rgb, "RGB")
    ds.compress(syntax)
    inst = load_instance(_save(ds, tmp_path))
    assert np.array_equal(inst.frames[0], rgb)


def test_rle_ybr_full_colours(tmp_path: Path) -> None:
    rgb = _colour_pattern()
    ds = _image(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    ds.compress(RLELossless)
    inst = load_instance(_save(ds, tmp_path))
    assert np.abs(inst.frames[0].astype(int) - rgb).max() <= 2


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_16bit_grey(tmp_path: Path, syntax: str) -> None:
    grey = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    ds = _image(grey, "MONOCHROME2", bits=12)
    ds.compress(syntax)
    inst = load_instance(_save(ds, tmp_path))
    expected = np.rint(grey.astype(np.float32) * 255.0 / 4095.0).astype(np.uint8)
    assert np.abs(inst.frames[0, ..., 0].astype(int) - expected).max() <= 1


def test_jpeg_baseline_ybr_full_422_colours(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (200, 30, 30)
    rgb[:, 16:] = (30, 60, 190)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=1)  # 4:2:2
    ds = _image(rgb, "RGB")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    inst = load_instance(_save(ds, tmp_path))
    # Away from the colour edge the colours survive (chroma is subsampled at the edge).
    assert np.abs(inst.frames[0, :, :12].astype(int) - (200, 30, 30)).max() <= 8
    assert np.abs(inst.frames[0, :, 20:].astype(int) - (30, 60, 190)).max() <= 8


def test_truncated_pixel_data_is_undecodable(tmp_path: Path) -> None:
    ds = _image(np.zeros((32, 32), np.uint8), "MONOCHROME2")
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.UNDECODABLE


def test_corrupt_compressed_data_is_undecodable(tmp_path: Path) -> None:
    ds = _image(np.zeros((32, 32), np.uint8), "MONOCHROME2")
    ds.compress(JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8garbage" * 4])
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.UNDECODABLE


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = _image(np.zeros((8, 8), np.uint8), "MONOCHROME2")
    del ds.PixelData
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.NO_PIXEL_DATA
    assert isinstance(err.value, ValueError)


def test_structured_report_is_not_image(tmp_path: Path) -> None:
    ds = _dataset(BASIC_TEXT_SR)
    ds.Modality = "SR"
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.NOT_IMAGE


def test_non_dicom_file_is_not_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a DICOM file at all")
    with pytest.raises(PixelDataError) as err:
        load_instance(path)
    assert err.value.reason is PixelErrorReason.NOT_IMAGE


@pytest.mark.parametrize("pi", ["YBR_PARTIAL_420", "YBR_PARTIAL_422", "CMYK", "ARGB", "HSV", ""])
def test_unsupported_photometric(tmp_path: Path, pi: str) -> None:
    ds = _image(_colour_pattern(), "RGB")
    ds.PhotometricInterpretation = pi
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.UNSUPPORTED_PHOTOMETRIC
    assert (pi or "(missing)") in str(err.value)


@pytest.mark.parametrize("bits", [1, 32])
def test_unsupported_bit_depth(tmp_path: Path, bits: int) -> None:
    ds = _image(np.zeros((8, 8), np.uint8), "MONOCHROME2")
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelData = b"\0" * (8 * 8 * bits // 8)
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.UNSUPPORTED_PHOTOMETRIC


def test_monochrome_with_three_samples_is_unsupported(tmp_path: Path) -> None:
    ds = _image(_colour_pattern(), "RGB")
    ds.PhotometricInterpretation = "MONOCHROME2"
    with pytest.raises(PixelDataError) as err:
        load_instance(_save(ds, tmp_path))
    assert err.value.reason is PixelErrorReason.UNSUPPORTED_PHOTOMETRIC
