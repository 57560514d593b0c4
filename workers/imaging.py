"""In-memory types passed between pixel decoding, quality control and inference.

Contract between ``workers/pixels.py`` (decoding), ``workers/qc.py`` (quality control)
and ``workers/models/inference.py`` (models). These live only inside one worker
process: they are never put on the broker (messages carry identifiers only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicom_sr.model import QCCheck, QCOutcome


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
            # Ultrasound Multi-frame Image Storage for a loop, Ultrasound Image Storage else.
            sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1" if n > 1 else "1.2.840.10008.5.1.4.1.1.6.1",
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
    scan_region: tuple[int, int, int, int] | None = None
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
