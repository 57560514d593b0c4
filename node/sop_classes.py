"""The storage SOP classes an ultrasound department sends, and which of them are analysed."""

from __future__ import annotations

from enum import StrEnum


class SOPClass(StrEnum):
    """Storage SOP classes the listener negotiates by default."""

    US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
    """Ultrasound Image Storage."""
    US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
    """Ultrasound Image Storage (Retired), still sent by older scanners."""
    US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
    """Ultrasound Multi-frame Image Storage (cine loops)."""
    US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
    """Ultrasound Multi-frame Image Storage (Retired)."""
    ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
    """Enhanced US Volume Storage (3D/4D); stored, not analysed."""
    SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
    """Secondary Capture Image Storage (screen captures of the scanner)."""
    MF_SC_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
    """Multi-frame Grayscale Byte Secondary Capture."""
    MF_SC_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"
    """Multi-frame True Color Secondary Capture."""
    BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
    """Basic Text SR (scanner worksheets)."""
    ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
    """Enhanced SR (vendor measurement reports)."""
    COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
    """Comprehensive SR (OB/GYN and vascular measurement reports)."""
    COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
    """Comprehensive 3D SR."""
    ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
    """Encapsulated PDF (worksheets)."""
    GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
    """Grayscale Softcopy Presentation State."""
    RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
    """Raw Data Storage (vendor RF data)."""


#: Image classes whose pixels the node analyses.
ANALYSED_CLASSES = frozenset(
    {
        SOPClass.US_IMAGE,
        SOPClass.US_IMAGE_RETIRED,
        SOPClass.US_MULTIFRAME,
        SOPClass.US_MULTIFRAME_RETIRED,
        SOPClass.SECONDARY_CAPTURE,
        SOPClass.MF_SC_BYTE,
        SOPClass.MF_SC_TRUE_COLOR,
    }
)

_ULTRASOUND_ONLY = frozenset(
    {
        SOPClass.US_IMAGE,
        SOPClass.US_IMAGE_RETIRED,
        SOPClass.US_MULTIFRAME,
        SOPClass.US_MULTIFRAME_RETIRED,
        SOPClass.ENHANCED_US_VOLUME,
    }
)


def is_analysed(sop_class_uid: str, modality: str | None) -> bool:
    """True for image instances of an ultrasound study that the models may see."""
    return sop_class_uid in ANALYSED_CLASSES and (modality or "").upper() == "US"


def is_ultrasound_department_object(sop_class_uid: str, modality: str | None) -> bool:
    """True when the instance belongs in an ultrasound node without special configuration.

    US image classes always do; the generic classes (secondary capture, SR, PDF, ...) do
    when their Modality is US (or, for documents, SR/DOC/OT from the ultrasound system).
    """
    if sop_class_uid in _ULTRASOUND_ONLY:
        return True
    modality = (modality or "").upper()
    if sop_class_uid in {c.value for c in SOPClass}:
        return modality in {"US", "SR", "DOC", "OT", "PR"}
    return False
