"""Coded concepts used in sononode Structured Reports.

Standard codes (DCM, SCT, UCUM, UMLS) are used wherever DICOM PS3.16 defines a
fitting concept; the private coding scheme :data:`PRIVATE_SCHEME` (``99SONONODE``)
covers the rest. Every concept the builder writes and the reader looks for is a
named constant here, so the two cannot drift apart.

Code values of the private scheme are stable identifiers: never reuse or
renumber one, add a new constant instead.
"""

from __future__ import annotations

import hashlib

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

COMMENT = CodedConcept.from_code(codes.DCM.Comment)
"""(121106, DCM, "Comment"): the one-line result of a measurement group, which viewers
(OHIF) use as the label of the region."""

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

PROCESSING_EQUIPMENT = CodedConcept.from_code(codes.DCM.ProcessingEquipment)
"""(109102, DCM, "Processing Equipment") of CID 7005: the standard's nearest code (highdicom
builds the Contributing Equipment item with it; :data:`AIR_PROCESSING_ALGORITHM` replaces
it)."""

IHE_SCHEME = "99IHE"
"""Coding Scheme Designator of IHE's trial-implementation codes (private to IHE until DICOM
assigns standard ones); declared in the SR's Coding Scheme Identification Sequence."""

IHE_SCHEME_NAME = "IHE trial implementation codes"
"""Coding Scheme Name written for :data:`IHE_SCHEME`."""

AIR_PROCESSING_ALGORITHM = CodedConcept(value="Newcode1", scheme_designator=IHE_SCHEME,
                                        meaning="Processing Algorithm")
"""IHE AI Results' Purpose of Reference of the Contributing Equipment item that identifies
each model pack: the trial-implementation code ("Newcode1", 99IHE), as MONAI Deploy writes
it, until DICOM assigns one (the sequence takes one item)."""

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

NOT_ANALYSED = _private("NOTANALYSED", "Image not analysed by the AI")
"""Study-level statement about an image the models gave no result for; its value says
why, an IMAGE child references the image and a TEXT child gives the reason in words."""

NOT_ANALYSED_QC = _private("QCFAILED", "Failed image quality control")
"""Value of :data:`NOT_ANALYSED`: QC found the image unusable."""

NOT_ANALYSED_OOD = _private("OODINPUT", "Outside what the AI models were trained on")
"""Value of :data:`NOT_ANALYSED`: the input is out of distribution."""

NOT_ANALYSED_NO_FRAME = _private("NOFRAME", "No usable frame")
"""Value of :data:`NOT_ANALYSED`: nothing in the image could be shown to the models."""

SOURCE_IMAGE = CodedConcept.from_code(codes.DCM.SourceOfMeasurement)
"""(121112, DCM, "Source of Measurement"): IMAGE item naming the image a statement is about."""

FRAMES_TEXT = _private("FRAMES", "Frames analysed")
"""TEXT of a measurement group: ``"12 of 24 (frame 7 shown)"``."""

SUPERSEDES = _private("SUPERSEDES", "Supersedes earlier AI report")
"""TEXT naming the report(s) this one replaces (also in the Predecessor Documents)."""

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
"""TEXT of a measurement group: the QC quality score of an image (0 to 1)."""

NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)
"""(1, UCUM, "no units"): unit of unitless scores."""

OOD_SCORE = _private("OODSCORE", "Out-of-distribution score")
"""The out-of-distribution detector's score (unitless): NUM child of an "Image not
analysed" statement, TEXT of an analysed image's measurement group."""

# Concepts of the TID 1500 / TID 1410 / TID 4019 structure itself, which highdicom writes
# for the builder; the reader looks for them by these constants.
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


def probability_concept(task: str, meaning: str, *, confident: bool) -> CodedConcept:
    """Concept name of the NUM that shows a label's probability on the image.

    Viewers that label an image region (OHIF) print each group-level NUM as
    ``<concept meaning>: <value> <unit>``: the meaning names the task and the label, e.g.
    ``"View: Thyroid transverse view (probability)"``, and says when the node is not
    confident. No standard concept names a probability *of a given label*, so this is a
    private code, stable for (task, label, confidence): a hash of them.
    """
    text = f"{task.replace('_', ' ').capitalize()}: {meaning}"
    text += " (probability)" if confident else " (NOT CONFIDENT, review)"
    if len(text) > 64:
        text = text[:61] + "..."
    digest = hashlib.sha1(f"{task}|{meaning}|{confident}".encode()).hexdigest()[:13].upper()
    return _private(f"P{digest}", text)
