"""Decode a DICOM instance's pixels into ``(N, rows, cols, 3)`` ``uint8`` RGB frames.

Decoding, colour-space conversion and look-up tables are pydicom's
(:mod:`pydicom.pixels`); this module only picks the frames of a long cine loop, maps
every photometric interpretation and bit depth to 8-bit RGB, and turns failures into a
typed :class:`PixelDataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)

from workers.imaging.types import DecodedInstance, UltrasoundRegion

logger = logging.getLogger(__name__)

#: Photometric interpretations this module turns into RGB. YBR_ICT and YBR_RCT exist
#: only in JPEG 2000, whose decoder returns RGB (the inverse colour transform is part of
#: the codestream).
SUPPORTED_PHOTOMETRIC = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "PALETTE COLOR",
    }
)

#: SOP classes that never hold an image (reports, presentation states, documents...),
#: identified by the start of their UID.
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9.",  # Waveforms
    "1.2.840.10008.5.1.4.1.1.66",  # Raw data, registration, segmentation
)


class PixelErrorReason(StrEnum):
    """Why an instance's pixels could not be decoded."""

    NO_PIXEL_DATA = "no_pixel_data"
    """The dataset has no (or empty) Pixel Data."""
    UNDECODABLE = "undecodable"
    """Pixel Data is present but could not be decoded (corrupt, truncated, unsupported
    transfer syntax or codec missing)."""
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    """A photometric interpretation (or bit depth) that cannot be mapped to RGB."""
    NOT_IMAGE = "not_image"
    """Not a DICOM image at all (not DICOM, or a report/document SOP class)."""


class PixelDataError(ValueError):
    """The instance's pixels could not be turned into RGB frames.

    ``reason`` is the stable :class:`PixelErrorReason` code.
    """

    def __init__(self, reason: PixelErrorReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


def sample_frame_indices(number_of_frames: int, max_frames: int) -> tuple[int, ...]:
    """At most ``max_frames`` indices spread evenly over ``number_of_frames``, first and last
    included."""
    if number_of_frames < 1:
        raise ValueError(f"number_of_frames must be >= 1, got {number_of_frames}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if number_of_frames <= max_frames:
        return tuple(range(number_of_frames))
    picks = np.linspace(0, number_of_frames - 1, max_frames).round().astype(int)
    return tuple(int(i) for i in np.unique(picks))


def sample_frames(usable: Sequence[int], max_frames: int) -> list[int]:
    """At most ``max_frames`` of the frame indices ``usable``, spread as
    :func:`sample_frame_indices` spreads them (first and last included)."""
    if not usable:
        return []
    return [usable[i] for i in sample_frame_indices(len(usable), max_frames)]


def grey_frames(frames: np.ndarray) -> np.ndarray:
    """``(N, rows, cols)`` float32 grey of ``(N, rows, cols, 3)`` (or grey) frames: channel mean."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4:
        # Channel by channel: far faster than a mean over a length-3 last axis.
        out = arr[..., 0].astype(np.float32)
        out += arr[..., 1]
        out += arr[..., 2]
        out *= np.float32(1.0 / 3.0)
        return out
    if arr.ndim == 3:
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"frames must be (N, rows, cols[, 3]), got shape {arr.shape}")


def load_instance(path: Path, *, max_frames: int = 16) -> DecodedInstance:
    """Read a DICOM file and decode at most ``max_frames`` frames to 8-bit RGB.

    Parameters
    ----------
    path
        The DICOM file (Part 10, or a bare dataset pydicom can read with ``force``).
    max_frames
        Cine loops are sampled evenly to this many frames; only those are decoded.

    Returns
    -------
    DecodedInstance
        Frames ``(N, rows, cols, 3)`` ``uint8`` RGB with the identifying header fields,
        ultrasound regions and frame time.

    Raises
    ------
    PixelDataError
        With reason ``not_image``, ``no_pixel_data``, ``undecodable`` or
        ``unsupported_photometric``.
    """
    try:
        ds = dcmread(path)
    except (InvalidDicomError, EOFError) as exc:
        raise PixelDataError(
            PixelErrorReason.NOT_IMAGE, f"{path} is not a readable DICOM file: {exc}"
        ) from exc
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed files
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE, f"{path} could not be parsed: {exc}"
        ) from exc
    return decode_dataset(ds, max_frames=max_frames)


def decode_dataset(ds: Dataset, *, max_frames: int = 16) -> DecodedInstance:
    """Decode an in-memory dataset as :func:`load_instance` does a file.

    Raises
    ------
    PixelDataError
        For every way the image cannot be decoded, malformed headers included (a wrong VR,
        a value of the wrong type or count, inconsistent pixel module attributes).
    """
    try:
        return _decode_dataset(ds, max_frames=max_frames)
    except PixelDataError:
        raise
    except MemoryError as exc:
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE, "the image is too large to decode"
        ) from exc
    except Exception as exc:
        # pydicom and the pixel handlers raise many types on malformed headers; none of
        # them may stop the rest of the study from being analysed.
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE,
            f"malformed image pixel module or pixel data ({type(exc).__name__})",
        ) from exc


def _decode_dataset(ds: Dataset, *, max_frames: int) -> DecodedInstance:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        raise PixelDataError(
            PixelErrorReason.NOT_IMAGE, f"SOP class {sop_class} does not hold an image"
        )
    if "PixelData" not in ds:
        if "Rows" not in ds:
            raise PixelDataError(
                PixelErrorReason.NOT_IMAGE,
                f"dataset (SOP class {sop_class or 'unknown'}) has no image pixel module",
            )
        raise PixelDataError(PixelErrorReason.NO_PIXEL_DATA, "dataset has no Pixel Data")
    if not ds["PixelData"].value:
        raise PixelDataError(PixelErrorReason.NO_PIXEL_DATA, "Pixel Data is empty")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        if keyword not in ds:
            raise PixelDataError(
                PixelErrorReason.UNDECODABLE, f"image pixel module lacks {keyword}"
            )
    stored_pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if stored_pi not in SUPPORTED_PHOTOMETRIC:
        raise PixelDataError(
            PixelErrorReason.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {stored_pi or '(missing)'} is not supported",
        )
    if int(ds.BitsAllocated) not in (8, 16):
        raise PixelDataError(
            PixelErrorReason.UNSUPPORTED_PHOTOMETRIC,
            f"Bits Allocated {ds.BitsAllocated} is not supported (8 or 16)",
        )
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    n_frames = max(1, n_frames)
    indices = sample_frame_indices(n_frames, max_frames)

    raw, decoded_pi = _decode_frames(ds, indices)
    frames = _to_rgb8(raw, decoded_pi, ds)
    return DecodedInstance(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=sop_class,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        manufacturer_model_name=str(ds.get("ManufacturerModelName", "")),
        photometric_interpretation=stored_pi,
        number_of_frames=n_frames,
        frame_indices=indices,
        frames=frames,
        us_regions=parse_us_regions(ds),
        frame_time_ms=frame_time_ms(ds),
    )


def _decode_frames(ds: Dataset, indices: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Decode the chosen frames with pydicom; return them and the photometric
    interpretation of the *decoded* data (pydicom turns YBR_FULL(_422) into RGB, and
    JPEG decoders apply the codestream's colour transform)."""
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not tsyntax:
        raise PixelDataError(PixelErrorReason.UNDECODABLE, "no Transfer Syntax UID")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE, f"transfer syntax {tsyntax} cannot be decoded"
        ) from exc
    if not decoder.is_available:
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE,
            f"no decoding plugin is installed for transfer syntax {tsyntax.name}",
        )
    decoded: list[np.ndarray] = []
    meta: dict[str, Any] = {}
    try:
        opts = as_pixel_options(ds)
        for arr, frame_meta in decoder.iter_array(ds, indices=indices, raw=False, **opts):
            decoded.append(arr)
            meta = frame_meta
    except PixelDataError:
        raise
    except Exception as exc:  # plugins raise anything from ValueError to RuntimeError
        raise PixelDataError(
            PixelErrorReason.UNDECODABLE,
            f"pixel data could not be decoded ({tsyntax.name}): {exc}",
        ) from exc
    if not decoded:
        raise PixelDataError(PixelErrorReason.UNDECODABLE, "no frame decoded")
    pi = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    return np.stack(decoded), pi


def _scale_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    top = float(2**bits - 1)
    scaled: np.ndarray = np.rint(arr.astype(np.float32) * (255.0 / top))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _grey_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """8-bit grey of stored values: 8-bit unsigned data as is; otherwise the modality LUT,
    then the header's window (VOI LUT) if any, else min-max over the decoded frames."""
    if arr.dtype == np.uint8 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        return arr
    values = apply_modality_lut(arr, ds).astype(np.float32)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float32)
        if "VOILUTSequence" in ds:
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = _window_output_range(ds)
    else:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * np.float32(255.0 / (hi - lo))
    rounded: np.ndarray = np.rint(scaled)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's windowing maps the window onto (PS3.3 C.11.2.1.2): the stored
    range, or the rescaled one."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        if int(ds.get("PixelRepresentation", 0)) == 0:
            lo, hi = 0.0, float(2**bits - 1)
        else:
            lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _to_rgb8(frames: np.ndarray, pi: str, ds: Dataset) -> np.ndarray:
    """``(N, rows, cols, 3)`` ``uint8`` RGB of decoded frames ``(N, rows, cols[, 3])``."""
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if frames.ndim != 3:
            raise PixelDataError(
                PixelErrorReason.UNSUPPORTED_PHOTOMETRIC,
                f"{pi} with {ds.SamplesPerPixel} samples per pixel",
            )
        grey = _grey_to_uint8(frames, ds)
        if pi == "MONOCHROME1":
            grey = 255 - grey
        return np.repeat(grey[..., None], 3, axis=-1)
    if pi == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(frames, ds)
        except Exception as exc:
            raise PixelDataError(
                PixelErrorReason.UNSUPPORTED_PHOTOMETRIC, f"palette could not be applied: {exc}"
            ) from exc
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 8])
        lut_bits = int(descriptor[2]) if len(descriptor) > 2 else 8
        return _scale_to_uint8(np.asarray(rgb), lut_bits)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise PixelDataError(
            PixelErrorReason.UNSUPPORTED_PHOTOMETRIC,
            f"{pi} frames of shape {frames.shape[1:]} are not 3-sample colour",
        )
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        # Only reached if a plugin left YCbCr as is.
        frames = convert_color_space(frames, pi, "RGB", per_frame=True)
    elif pi not in ("RGB", "YBR_ICT", "YBR_RCT"):
        raise PixelDataError(PixelErrorReason.UNSUPPORTED_PHOTOMETRIC, f"decoded colour space {pi}")
    return _scale_to_uint8(frames, bits)


def parse_us_regions(ds: Dataset) -> tuple[UltrasoundRegion, ...]:
    """The Sequence of Ultrasound Regions (0018,6011) as :class:`UltrasoundRegion`s.

    Items missing a location are skipped (logged), never fatal.
    """
    regions: list[UltrasoundRegion] = []
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            regions.append(
                UltrasoundRegion(
                    min_x0=int(item.RegionLocationMinX0),
                    min_y0=int(item.RegionLocationMinY0),
                    max_x1=int(item.RegionLocationMaxX1),
                    max_y1=int(item.RegionLocationMaxY1),
                    spatial_format=_opt_int(item.get("RegionSpatialFormat")),
                    data_type=_opt_int(item.get("RegionDataType")),
                    physical_delta_x=_opt_float(item.get("PhysicalDeltaX")),
                    physical_delta_y=_opt_float(item.get("PhysicalDeltaY")),
                    physical_units_x=_opt_int(item.get("PhysicalUnitsXDirection")),
                    physical_units_y=_opt_int(item.get("PhysicalUnitsYDirection")),
                )
            )
        except (AttributeError, TypeError, ValueError) as exc:
            logger.warning("skipping an ultrasound region without a valid location: %s", exc)
    return tuple(regions)


def frame_time_ms(ds: Dataset) -> float | None:
    """Frame Time (0018,1063) in ms, else the mean of the Frame Time Vector, else
    1000 / Cine Rate or Recommended Display Frame Rate; None for a still image."""
    value = _opt_float(ds.get("FrameTime"))
    if value is not None and value > 0:
        return value
    vector = ds.get("FrameTimeVector")
    if vector:
        try:
            steps = [float(v) for v in vector][1:]  # the first entry is 0 by definition
        except (TypeError, ValueError):
            steps = []
        if steps and sum(steps) > 0:
            return sum(steps) / len(steps)
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _opt_float(ds.get(keyword))
        if rate is not None and rate > 0:
            return 1000.0 / rate
    return None


def _opt_int(value: object) -> int | None:
    try:
        return None if value is None or value == "" else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _opt_float(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
