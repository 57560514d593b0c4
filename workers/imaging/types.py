"""Types passed between pixel decoding, quality control and inference.

The contract between :mod:`workers.imaging.pixels` (decoding), :mod:`workers.imaging.qc`
(quality control) and :mod:`workers.models.inference` (models). :class:`DecodedInstance`,
:class:`InstanceQC` and :class:`PreparedInstance` live only inside one worker process;
:class:`QCRecord` and :class:`StudyQC` are QC's outcome as it crosses from the QC stage to
the inference stage, stored as JSON in the job row (messages carry identifiers only).
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from dicom_sr.model import QCCheck, QCOutcome

Box = tuple[int, int, int, int]
"""``(column0, row0, column1, row1)`` in frame pixels, exclusive end."""


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions (0018,6011); pixel bounds inclusive."""

    min_x0: int
    min_y0: int
    max_x1: int
    max_y1: int
    spatial_format: int | None = None
    """Region Spatial Format (0018,6012): 1 = 2D (tissue image), 2 = M-mode, 3 = spectral, ..."""
    data_type: int | None = None
    """Region Data Type (0018,6014): 1 = tissue, 2 = colour flow, ..."""
    physical_delta_x: float | None = None
    physical_delta_y: float | None = None
    physical_units_x: int | None = None
    physical_units_y: int | None = None


@dataclass(frozen=True)
class DecodedInstance:
    """Pixels and identifying header fields of one source instance, ready for QC.

    ``frames`` is always ``(N, rows, columns, 3)`` ``uint8`` RGB, whatever the stored
    photometric interpretation, bit depth or planar configuration (grey images are
    replicated to three channels). ``frame_indices`` are the 0-based indices of these
    frames within the instance (a long cine loop is sampled; ``number_of_frames`` is the
    stored count).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    manufacturer: str
    manufacturer_model_name: str
    photometric_interpretation: str
    number_of_frames: int
    frame_indices: tuple[int, ...]
    frames: np.ndarray
    us_regions: tuple[UltrasoundRegion, ...] = ()
    frame_time_ms: float | None = None

    @classmethod
    def from_pixels(
        cls,
        pixels: np.ndarray,
        *,
        us_regions: tuple[UltrasoundRegion, ...] = (),
        frame_time_ms: float | None = None,
        manufacturer: str = "Sim",
        sop_instance_uid: str = "1.2.3.4",
        modality: str = "US",
    ) -> DecodedInstance:
        """An RGB ultrasound instance built in memory (an image file, tests, benchmarks).

        ``pixels`` is a grey ``(rows, columns)`` frame, an RGB ``(rows, columns, 3)`` frame
        or an RGB ``(frames, rows, columns, 3)`` loop; study and series UIDs are fixed
        placeholders.
        """
        frames = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
        if frames.ndim == 3:
            frames = frames[None]
        n = frames.shape[0]
        return cls(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=str(UltrasoundMultiFrameImageStorage if n > 1
                              else UltrasoundImageStorage),
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.5",
            modality=modality,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer,
            photometric_interpretation="RGB",
            number_of_frames=n,
            frame_indices=tuple(range(n)),
            frames=np.ascontiguousarray(frames),
            us_regions=us_regions,
            frame_time_ms=frame_time_ms,
        )

    def without_pixels(self) -> DecodedInstance:
        """The same instance with no frames (its header fields only)."""
        return dataclasses.replace(self, frames=NO_FRAMES, frame_indices=())


#: The ``frames`` of a :class:`DecodedInstance` that holds its header fields only.
NO_FRAMES = np.zeros((0, 1, 1, 3), dtype=np.uint8)
NO_FRAMES.flags.writeable = False


@dataclass(frozen=True)
class InstanceQC:
    """Quality-control outcome for one instance.

    ``usable_frames`` index into ``DecodedInstance.frames`` (frames that passed and may
    be shown to the models). ``scan_region`` is the ultrasound image region found in the
    frame as ``(column0, row0, column1, row1)`` (exclusive end), and ``scan_mask`` its
    boolean ``(rows, columns)`` mask, both ``None`` when no region was found.
    """

    outcome: QCOutcome
    checks: tuple[QCCheck, ...]
    usable_frames: tuple[int, ...]
    scan_region: Box | None = None
    scan_mask: np.ndarray | None = None
    colour_fraction: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    """Simple input statistics (mean, std, ...) recorded for drift monitoring."""

    @property
    def failed(self) -> bool:
        """True when the instance must not be shown to the models."""
        return self.outcome is QCOutcome.FAIL or not self.usable_frames


@dataclass(frozen=True)
class PreparedInstance:
    """A decoded instance with its QC outcome: the unit inference works on."""

    instance: DecodedInstance
    qc: InstanceQC


@dataclass(frozen=True)
class QCRecord:
    """QC's outcome for one instance as the inference stage receives it.

    Unlike :class:`InstanceQC`, usable frames are indices within the *instance*
    (``usable_frame_indices``), not within one decoded sample of it, and the scan mask is
    kept, so that inference crops exactly what QC found without looking for it again.
    """

    outcome: QCOutcome
    checks: tuple[QCCheck, ...]
    usable_frame_indices: tuple[int, ...]
    frames_total: int
    scan_region: Box | None = None
    scan_mask: np.ndarray | None = field(default=None, compare=False)
    """Boolean ``(rows, columns)`` mask of the scan region, ``None`` when none was found."""
    colour_fraction: float = 0.0
    stats: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, qc: InstanceQC, decoded: DecodedInstance | None, *,
           frames_total: int) -> QCRecord:
        """The record of ``qc`` on ``decoded`` (``None``: the instance could not be decoded)."""
        usable = tuple(int(decoded.frame_indices[i]) for i in qc.usable_frames) if decoded else ()
        return cls(outcome=qc.outcome, checks=tuple(qc.checks), usable_frame_indices=usable,
                   frames_total=int(frames_total), scan_region=qc.scan_region,
                   scan_mask=qc.scan_mask, colour_fraction=float(qc.colour_fraction),
                   stats={k: float(v) for k, v in qc.stats.items()})

    def for_instance(self, decoded: DecodedInstance) -> InstanceQC:
        """QC's outcome on ``decoded`` (a decoding of the same instance): usable frames are
        mapped to positions in its sample; a mask of another frame size is dropped."""
        position = {int(f): i for i, f in enumerate(decoded.frame_indices)}
        mask = self.scan_mask
        if mask is not None and mask.shape != decoded.frames.shape[1:3]:
            mask = None
        return InstanceQC(
            outcome=self.outcome, checks=self.checks,
            usable_frames=tuple(position[f] for f in self.usable_frame_indices if f in position),
            scan_region=self.scan_region, scan_mask=mask,
            colour_fraction=self.colour_fraction, stats=dict(self.stats),
        )

    def without_frames(self) -> InstanceQC:
        """QC's outcome for an instance that is not decoded again (nothing usable)."""
        return InstanceQC(outcome=self.outcome, checks=self.checks, usable_frames=(),
                          scan_region=self.scan_region, colour_fraction=self.colour_fraction,
                          stats=dict(self.stats))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the mask compressed, see :func:`encode_mask`)."""
        return {
            "outcome": self.outcome.value,
            "checks": [check.to_json() for check in self.checks],
            "usable_frame_indices": list(self.usable_frame_indices),
            "frames_total": self.frames_total,
            "scan_region": list(self.scan_region) if self.scan_region else None,
            "scan_mask": encode_mask(self.scan_mask, self.scan_region),
            "colour_fraction": self.colour_fraction,
            "stats": dict(self.stats),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QCRecord:
        """The record :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            If a key is missing or the mask cannot be decoded.
        """
        try:
            region = data.get("scan_region")
            box: Box | None = None
            if region is not None:
                c0, r0, c1, r1 = (int(v) for v in region)
                box = (c0, r0, c1, r1)
            return cls(
                outcome=QCOutcome(data["outcome"]),
                checks=tuple(QCCheck.from_json(c) for c in data["checks"]),
                usable_frame_indices=tuple(int(i) for i in data["usable_frame_indices"]),
                frames_total=int(data["frames_total"]),
                scan_region=box,
                scan_mask=decode_mask(data.get("scan_mask")),
                colour_fraction=float(data.get("colour_fraction", 0.0)),
                stats={str(k): float(v) for k, v in data.get("stats", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed QC record: {exc!r}") from exc


@dataclass(frozen=True)
class StudyQC:
    """QC of a whole study: a record per analysed instance and the study-level checks."""

    instances: Mapping[str, QCRecord]
    """By SOP Instance UID, in the order the instances are analysed."""
    assessable: bool
    study_checks: tuple[QCCheck, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored as ``Job.qc``)."""
        return {
            "instances": {uid: record.to_json() for uid, record in self.instances.items()},
            "assessable": self.assessable,
            "study_checks": [check.to_json() for check in self.study_checks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyQC:
        """The study QC :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            If a key is missing or a record is malformed.
        """
        try:
            return cls(
                instances={str(uid): QCRecord.from_json(record)
                           for uid, record in data["instances"].items()},
                assessable=bool(data["assessable"]),
                study_checks=tuple(QCCheck.from_json(c) for c in data.get("study_checks", ())),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed study QC: {exc!r}") from exc


def encode_mask(mask: np.ndarray | None, box: Box | None) -> dict[str, Any] | None:
    """A boolean mask as JSON: its shape, and the bits inside ``box`` (it is empty outside)
    packed, zlib-compressed and base64-encoded (a few hundred bytes for a sector)."""
    if mask is None:
        return None
    rows, cols = mask.shape
    c0, r0, c1, r1 = box if box is not None else (0, 0, cols, rows)
    inside = np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=bool)
    packed = zlib.compress(np.packbits(inside).tobytes(), 6)
    return {"shape": [rows, cols], "box": [c0, r0, c1, r1],
            "bits": base64.b64encode(packed).decode("ascii")}


def decode_mask(data: Mapping[str, Any] | None) -> np.ndarray | None:
    """The mask :func:`encode_mask` wrote.

    Raises
    ------
    ValueError
        If the data do not describe a mask of their stated shape.
    """
    if data is None:
        return None
    try:
        rows, cols = (int(v) for v in data["shape"])
        c0, r0, c1, r1 = (int(v) for v in data["box"])
        bits = np.frombuffer(zlib.decompress(base64.b64decode(data["bits"])), dtype=np.uint8)
        count = (r1 - r0) * (c1 - c0)
        inside = np.unpackbits(bits, count=count).astype(bool).reshape(r1 - r0, c1 - c0)
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"malformed scan mask: {exc!r}") from exc
    mask = np.zeros((rows, cols), dtype=bool)
    mask[r0:r1, c0:c1] = inside
    return mask
