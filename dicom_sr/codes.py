"""Coded concepts used in sononode Structured Reports.

Standard codes (DCM, SCT, UCUM, UMLS) are used wherever DICOM PS3.16 defines a
fitting concept; the private coding scheme :data:`PRIVATE_SCHEME` (``99SONONODE``)
covers the rest. Every concept the builder writes and the reader looks for is a
named constant here, so the two cannot drift apart.

Code values of the private scheme are stable identifiers: never reuse or
renumber one, add a new constant instead.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from dicom_sr.model import QCOutcome

PRIVATE_SCHEME = "99SONONODE"
"""Coding Scheme Designator of sononode's private concepts (PS3.16 §8.2: ``99`` prefix)."""

PRIVATE_SCHEME_NAME = "sononode private codes"
"""Coding Scheme Name written to the Coding Scheme Identification Sequence."""


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _standard(value: str, scheme: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


# --------------------------------------------------------------------------------------
# Document
# --------------------------------------------------------------------------------------
TITLE = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
"""(126000, DCM, "Imaging Measurement Report"): the TID 1500 document title."""

TITLE_SIMULATED = _private(
    "SIMREPORT",
    "AI Report - SIMULATED TRAINING DATA - NOT FOR CLINICAL USE",
)
"""Document title used when any model pack was trained on simulated images."""

PROCEDURE_ULTRASOUND = CodedConcept.from_code(codes.SCT.DiagnosticUltrasonography)
"""(16310003, SCT, "Diagnostic ultrasonography"): the procedure reported."""

QUALITATIVE_EVALUATIONS = _standard("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 10 container holding the study-level statements."""

# --------------------------------------------------------------------------------------
# Classifications
# --------------------------------------------------------------------------------------
IMAGE_VIEW = CodedConcept.from_code(codes.DCM.ImageView)
"""(111031, DCM, "Image View"): concept name of the view classification."""

FINDING = CodedConcept.from_code(codes.DCM.Finding)
"""(121071, DCM, "Finding"): concept name of the diagnosis classification."""

CONCLUSION = CodedConcept.from_code(codes.DCM.Conclusion)
"""(121077, DCM, "Conclusion"): concept name of the study-level conclusion."""

PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
"""(122157, DCM, "Probability"): calibrated probability of a classification label."""

DECISION_THRESHOLD = _private("THRESHOLD", "Decision threshold")
"""Probability below which the node abstains from a classification."""

PERCENT = CodedConcept.from_code(codes.UCUM.Percent)
"""(%, UCUM, "Percent"): unit of probabilities; viewers show ``93.1 %``."""

ALGORITHM_FAMILY = CodedConcept.from_code(codes.DCM.ArtificialIntelligence)
"""(123110, DCM, "Artificial Intelligence"): TID 4019 algorithm family."""

MODEL_USED = _private("MODEL", "AI model used")
"""Study-level item listing one model pack (carries its TID 4019 identification)."""

# --------------------------------------------------------------------------------------
# Review, assessability, disclaimer
# --------------------------------------------------------------------------------------
HUMAN_REVIEW = _private("REVIEW", "Human review")
"""Concept name of the review statement (image or study level)."""

REQUIRES_HUMAN_REVIEW = _private("REVIEWREQ", "Requires human review")
"""Value replacing a withheld (abstained) label, and of the review statement."""

REVIEW_REASON = _private("REVIEWWHY", "Reason for human review")
"""TEXT child of a review statement or of a withheld classification."""

ASSESSABILITY = _private("ASSESS", "Study assessability")
"""Concept name of the study assessability statement."""

NOT_ASSESSABLE = _private("NOTASSESS", "Not assessable by the AI models")
"""Value of :data:`ASSESSABILITY` when the study could not be analysed."""

NOT_ASSESSABLE_REASON = _private("NOTASSESSWHY", "Reason study is not assessable")
"""TEXT child of the not-assessable statement."""

DISCLAIMER = _private("DISCLAIMER", "Disclaimer")
"""TEXT item carrying the simulated-training-data disclaimer."""

SUMMARY = CodedConcept.from_code(codes.DCM.Summary)
"""(121111, DCM, "Summary"): plain-text summary for viewers that hide codes."""

# --------------------------------------------------------------------------------------
# Quality control, frames, out-of-distribution
# --------------------------------------------------------------------------------------
IMAGE_QUALITY = CodedConcept.from_code(codes.DCM.ImageQuality)
"""(111101, DCM, "Image Quality"): concept name of the QC outcome of an image."""

QC_OUTCOME_CODES: dict[QCOutcome, CodedConcept] = {
    QCOutcome.PASS: CodedConcept.from_code(codes.DCM.UsableMeetsTheQualityControlStandard),
    QCOutcome.WARN: CodedConcept.from_code(codes.DCM.UsableDoesNotMeetTheQualityControlStandard),
    QCOutcome.FAIL: CodedConcept.from_code(codes.DCM.UnusableQualityRendersImageUnusable),
}
"""QC outcome to CID 6044 "Image Quality Assessment" values (111237, 111236, 111235 DCM)."""

QC_REASON = _private("QCREASON", "Quality control reason")
"""TEXT item ``"<check code>: <message>"`` for each non-pass QC check."""

QC_CHECK_OUTCOME = _private("QCCHECK", "Quality control check outcome")
"""CODE child of :data:`QC_REASON` giving that check's outcome (CID 6044 value)."""

QUALITY_SCORE = _private("QSCORE", "Image quality score")
"""NUM: the QC quality score of an image (unitless)."""

NUMBER_OF_FRAMES = CodedConcept.from_code(codes.DCM.NumberOfFrames)
"""(121140, DCM, "Number of Frames"): frames in the source instance."""

FRAMES_ANALYSED = _private("FRAMESUSED", "Number of frames analysed")
"""NUM: frames that passed QC and were given to the models."""

FRAMES_UNIT = _standard("{frames}", "UCUM", "frames")
"""UCUM annotation unit for frame counts."""

NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)
"""(1, UCUM, "no units"): unit of unitless scores."""

OUT_OF_DISTRIBUTION = _private("OOD", "Out-of-distribution input")
"""CODE (Yes/No): the image lies outside the training distribution of the models."""

OOD_SCORE = _private("OODSCORE", "Out-of-distribution score")
"""NUM child of :data:`OUT_OF_DISTRIBUTION`: the detector's score (unitless)."""

YES = CodedConcept.from_code(codes.SCT.Yes)
"""(373066001, SCT, "Yes")."""

NO = CodedConcept.from_code(codes.SCT.No)
"""(373067005, SCT, "No")."""

# Concepts of the TID 1500 / TID 1501 / TID 4019 structure itself, which highdicom writes
# for the builder; the reader looks for them by these constants.
MEASUREMENT_GROUP = CodedConcept.from_code(codes.DCM.MeasurementGroup)
"""(125007, DCM, "Measurement Group"): one per analysed image."""

IMAGING_MEASUREMENTS = CodedConcept.from_code(codes.DCM.ImagingMeasurements)
"""(126010, DCM, "Imaging Measurements"): the container of the measurement groups."""

TRACKING_IDENTIFIER = CodedConcept.from_code(codes.DCM.TrackingIdentifier)
"""(112039, DCM, "Tracking Identifier") of a measurement group."""

TRACKING_UID = CodedConcept.from_code(codes.DCM.TrackingUniqueIdentifier)
"""(112040, DCM, "Tracking Unique Identifier") of a measurement group."""

ALGORITHM_NAME = CodedConcept.from_code(codes.DCM.AlgorithmName)
"""(111001, DCM, "Algorithm Name") of TID 4019."""

ALGORITHM_VERSION = CodedConcept.from_code(codes.DCM.AlgorithmVersion)
"""(111003, DCM, "Algorithm Version") of TID 4019."""

ALGORITHM_PARAMETERS = CodedConcept.from_code(codes.DCM.AlgorithmParameters)
"""(111002, DCM, "Algorithm Parameters") of TID 4019 (``sha256=...``)."""

SIMULATED_SUFFIX = " [trained on simulated images - NOT FOR CLINICAL USE]"
"""Appended to the TID 4019 Algorithm Name of packs trained on simulated data."""

SIMULATED_DISCLAIMER = (
    "WARNING: one or more AI models used for this report were trained on simulated "
    "images only. The results are NOT FOR CLINICAL USE."
)
"""Text of the disclaimer item (and of the Series Description suffix)."""
