"""sononode Structured Report building and reading (highdicom, TID 1500)."""

from dicom_sr.builder import build_sr, tracking_uid
from dicom_sr.reader import (
    AlgorithmIdentity,
    ImageSummary,
    LabelSummary,
    QCReason,
    SRSummary,
    read_sr,
)

__all__ = [
    "AlgorithmIdentity",
    "ImageSummary",
    "LabelSummary",
    "QCReason",
    "SRSummary",
    "build_sr",
    "read_sr",
    "tracking_uid",
]
