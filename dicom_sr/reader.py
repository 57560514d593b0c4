"""Read back what :func:`dicom_sr.builder.build_sr` wrote.

:func:`read_sr` is a pure function over an SR dataset (already read, e.g. by
``pydicom.dcmread``) returning an :class:`SRSummary`: per referenced source
instance the view and finding with their probabilities, the QC outcome and
reasons, the review flag and the algorithm identities. The standard parts (TID 1500,
its TID 1410 groups, their measurements and qualitative evaluations) are read through
highdicom's own template classes; only the node's private items are walked by hand,
with the constants of :mod:`dicom_sr.codes` the builder writes them with. It is a unit
test of the builder, not the acceptance: that is OHIF's SR extension (``tests/ohif``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from highdicom.sr import MeasurementReport
from pydicom.dataset import Dataset

from dicom_sr import codes
from dicom_sr.model import CodedLabel, QCOutcome

logger = logging.getLogger(__name__)

_Key = tuple[str, str]


def _key(concept: Dataset) -> _Key:
    return (str(concept.CodeValue), str(concept.CodingSchemeDesignator))


_IMAGE_VIEW = _key(codes.IMAGE_VIEW)
_FINDING = _key(codes.FINDING)
_CONCLUSION = _key(codes.CONCLUSION)
_PROBABILITY = _key(codes.PROBABILITY)
_THRESHOLD = _key(codes.DECISION_THRESHOLD)
_REVIEW = _key(codes.HUMAN_REVIEW)
_REVIEW_REASON = _key(codes.REVIEW_REASON)
_ASSESSABILITY = _key(codes.ASSESSABILITY)
_NOT_ASSESSABLE_REASON = _key(codes.NOT_ASSESSABLE_REASON)
_DISCLAIMER = _key(codes.DISCLAIMER)
_SUMMARY = _key(codes.SUMMARY)
_IMAGE_QUALITY = _key(codes.IMAGE_QUALITY)
_QC_REASON = _key(codes.QC_REASON)
_QC_CHECK_OUTCOME = _key(codes.QC_CHECK_OUTCOME)
_QUALITY_SCORE = _key(codes.QUALITY_SCORE)
_FRAMES = _key(codes.FRAMES_TEXT)
_COMMENT = _key(codes.COMMENT)
_NOT_ANALYSED = _key(codes.NOT_ANALYSED)
_NOT_ANALYSED_OOD = _key(codes.NOT_ANALYSED_OOD)
_OOD_SCORE = _key(codes.OOD_SCORE)
_MODEL_USED = _key(codes.MODEL_USED)
_QUALITATIVE_EVALUATIONS = _key(codes.QUALITATIVE_EVALUATIONS)
_PERCENT = _key(codes.PERCENT)
_QC_OUTCOMES = {_key(code): outcome for outcome, code in codes.QC_OUTCOME_CODES.items()}

_TRACKING_ID = _key(codes.TRACKING_IDENTIFIER)
_TRACKING_UID = _key(codes.TRACKING_UID)
_ALGORITHM_NAME = _key(codes.ALGORITHM_NAME)
_ALGORITHM_VERSION = _key(codes.ALGORITHM_VERSION)
_ALGORITHM_PARAMETERS = _key(codes.ALGORITHM_PARAMETERS)


@dataclass(frozen=True)
class AlgorithmIdentity:
    """A model pack as identified in the SR (TID 4019)."""

    name: str
    """Algorithm name, without the simulated-data suffix."""
    version: str
    """Algorithm version."""
    sha256: str | None
    """SHA-256 of the model pack, from the ``sha256=`` algorithm parameter."""
    simulated_training_data: bool
    """True when the name carried :data:`dicom_sr.codes.SIMULATED_SUFFIX`."""


@dataclass(frozen=True)
class LabelSummary:
    """A classification (view, finding or conclusion) as written in the SR."""

    code: CodedLabel | None
    """The reported label; None when the result was withheld for human review."""
    probability: float | None
    """Calibrated probability in [0, 1]; None when withheld."""
    threshold: float | None
    """Decision threshold in [0, 1], if one was written."""
    abstained: bool
    """True when the SR says "Requires human review" instead of a label."""
    reason: str | None
    """Why the label was withheld."""
    algorithm: AlgorithmIdentity | None
    """The model that produced the classification."""

    @property
    def label(self) -> str | None:
        """Code meaning of the reported label, as a viewer shows it."""
        return self.code.meaning if self.code is not None else None


@dataclass(frozen=True)
class QCReason:
    """A non-pass QC check of one image."""

    code: str
    """Stable reason code, e.g. ``"blank"``."""
    outcome: QCOutcome
    """Outcome of this check (warn or fail)."""
    message: str
    """Human-readable message."""


@dataclass(frozen=True)
class ImageSummary:
    """What the SR says about one referenced source instance."""

    sop_instance_uid: str
    sop_class_uid: str
    tracking_identifier: str | None
    tracking_uid: str | None
    region: tuple[int, int, int, int] | None
    """Bounding box ``(column0, row0, column1, row1)`` of the image region, if any."""
    view: LabelSummary | None
    finding: LabelSummary | None
    qc_outcome: QCOutcome | None
    qc_reasons: tuple[QCReason, ...]
    quality_score: float | None
    frames_total: int | None
    frames_used: int | None
    out_of_distribution: bool
    ood_score: float | None
    needs_review: bool
    review_reasons: tuple[str, ...]
    comment: str | None = None
    """The group's one-line result (what OHIF labels the region with)."""


@dataclass(frozen=True)
class SRSummary:
    """Summary of a sononode SR; see :func:`read_sr`."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    title: str
    images: Mapping[str, ImageSummary]
    """Per referenced SOP Instance UID, in document order."""
    conclusion: LabelSummary | None
    needs_review: bool
    review_reasons: tuple[str, ...]
    assessable: bool
    not_assessable_reasons: tuple[str, ...]
    algorithms: tuple[AlgorithmIdentity, ...]
    """The model packs listed at study level ("AI model used")."""
    simulated_training_data: bool
    disclaimer: str | None
    summary_text: str | None
    evidence: tuple[str, ...] = field(default=())
    """SOP Instance UIDs of the Current Requested Procedure Evidence Sequence."""
    predecessors: tuple[str, ...] = field(default=())
    """SOP Instance UIDs of the Predecessor Documents Sequence."""


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def read_sr(ds: Dataset) -> SRSummary:
    """Summarise a sononode SR.

    Parameters
    ----------
    ds
        The SR dataset, as built by :func:`dicom_sr.builder.build_sr` or read from
        a file written from it.

    Returns
    -------
    SRSummary
        Study-level statements and, per referenced source instance, an
        :class:`ImageSummary`.

    Raises
    ------
    ValueError
        If ``ds`` is not an SR document with a TID 1500 root container, or if an
        item the builder always writes is malformed.
    """
    if "ContentSequence" not in ds or ds.get("ValueType") != "CONTAINER":
        raise ValueError("dataset is not an SR document: no root CONTAINER content item")
    templates = ds.get("ContentTemplateSequence") or []
    if not templates or str(templates[0].get("TemplateIdentifier")) != "1500":
        raise ValueError("SR root container is not a TID 1500 Measurement Report")
    try:
        return _read(ds)
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed sononode SR {ds.get('SOPInstanceUID')}: {exc}") from exc


# --------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------
def _name(item: Dataset) -> _Key:
    return _key(item.ConceptNameCodeSequence[0])


def _children(item: Dataset) -> Iterator[Dataset]:
    yield from item.get("ContentSequence", [])


def _find(item: Dataset, name: _Key) -> list[Dataset]:
    return [child for child in _children(item) if _name(child) == name]


def _code_value(item: Dataset) -> Dataset:
    value: Dataset = item.ConceptCodeSequence[0]
    return value


def _num(item: Dataset) -> float:
    measured = item.MeasuredValueSequence[0]
    value = float(measured.NumericValue)
    if _key(measured.MeasurementUnitsCodeSequence[0]) == _PERCENT:
        return value / 100.0
    return value


def _texts(item: Dataset, name: _Key) -> tuple[str, ...]:
    return tuple(str(child.TextValue) for child in _find(item, name))


def _algorithm(item: Dataset) -> AlgorithmIdentity | None:
    names = _texts(item, _ALGORITHM_NAME)
    if not names:
        return None
    versions = _texts(item, _ALGORITHM_VERSION)
    sha = next(
        (p.split("=", 1)[1] for p in _texts(item, _ALGORITHM_PARAMETERS)
         if p.startswith("sha256=")),
        None,
    )
    name = names[0]
    simulated = name.endswith(codes.SIMULATED_SUFFIX)
    if simulated:
        name = name[: -len(codes.SIMULATED_SUFFIX)]
    return AlgorithmIdentity(
        name=name, version=versions[0] if versions else "", sha256=sha,
        simulated_training_data=simulated,
    )


def _coded(value: Dataset) -> CodedLabel:
    return CodedLabel(value=str(value.CodeValue), scheme=str(value.CodingSchemeDesignator),
                      meaning=str(value.CodeMeaning))


def _conclusion(item: Dataset) -> LabelSummary:
    probabilities = _find(item, _PROBABILITY)
    thresholds = _find(item, _THRESHOLD)
    reviews = _find(item, _REVIEW)
    reasons = _texts(reviews[0], _REVIEW_REASON) if reviews else ()
    return LabelSummary(code=_coded(_code_value(item)),
                        probability=_num(probabilities[0]) if probabilities else None,
                        threshold=_num(thresholds[0]) if thresholds else None,
                        abstained=bool(reviews),
                        reason=reasons[0] if reasons else None, algorithm=_algorithm(item))


def _probability_label(measurement: Dataset, code: CodedLabel | None,
                       reasons: tuple[str, ...]) -> LabelSummary:
    """A group-level probability measurement (see ``codes.probability_concept``)."""
    meaning = str(measurement.ConceptNameCodeSequence[0].CodeMeaning)
    abstained = "NOT CONFIDENT" in meaning
    thresholds = _find(measurement, _THRESHOLD)
    return LabelSummary(code=code, probability=_num(measurement),
                        threshold=_num(thresholds[0]) if thresholds else None,
                        abstained=abstained,
                        reason=next(iter(reasons), None) if abstained else None,
                        algorithm=_algorithm(measurement))


def _region(scoord: Dataset) -> tuple[str, str, tuple[int, int, int, int]]:
    image = next(c for c in _children(scoord) if c.ValueType == "IMAGE")
    ref = image.ReferencedSOPSequence[0]
    data = [float(v) for v in scoord.GraphicData]
    columns, rows = data[0::2], data[1::2]
    region = (round(min(columns)), round(min(rows)), round(max(columns)), round(max(rows)))
    return str(ref.ReferencedSOPInstanceUID), str(ref.ReferencedSOPClassUID), region


def _frames(group: Dataset) -> tuple[int | None, int | None]:
    texts = _texts(group, _FRAMES)
    match = re.match(r"(\d+) of (\d+)", texts[0]) if texts else None
    return (int(match[2]), int(match[1])) if match else (None, None)


def _qc_reasons(item: Dataset, name: _Key) -> tuple[QCReason, ...]:
    reasons = []
    for text in _find(item, name):
        outcomes = _find(text, _QC_CHECK_OUTCOME)
        outcome = (_QC_OUTCOMES[_key(_code_value(outcomes[0]))] if outcomes
                   else QCOutcome.WARN)
        reasons.append(QCReason(code="", outcome=outcome, message=str(text.TextValue)))
    return tuple(reasons)


def _analysed_image(group: Dataset) -> ImageSummary:
    """One TID 1410 group, through highdicom's template."""
    sop_uid, sop_class, region = _region(group_scoord(group))
    evaluations = {_key(_name_of(e)): e for e in _children(group)
                   if e.ValueType == "CODE"}
    view_code = (_coded(_code_value(evaluations[_IMAGE_VIEW]))
                 if _IMAGE_VIEW in evaluations else None)
    finding_code = (_coded(_code_value(evaluations[_FINDING]))
                    if _FINDING in evaluations else None)
    quality = evaluations.get(_IMAGE_QUALITY)
    reasons = _texts(group, _REVIEW_REASON)
    measurements = [c for c in _children(group) if c.ValueType == "NUM"
                    and str(_name_of(c).CodeMeaning).endswith(("(probability)",
                                                                "(NOT CONFIDENT, review)"))]
    view = next((m for m in measurements
                 if str(_name_of(m).CodeMeaning).startswith("View:")), None)
    finding = next((m for m in measurements if m is not view), None)
    scores = _texts(group, _QUALITY_SCORE)
    ood = _texts(group, _OOD_SCORE)
    total, used = _frames(group)
    tracking_ids = _texts(group, _TRACKING_ID)
    tracking_uids = [str(c.UID) for c in _find(group, _TRACKING_UID)]
    return ImageSummary(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        tracking_identifier=tracking_ids[0] if tracking_ids else None,
        tracking_uid=tracking_uids[0] if tracking_uids else None,
        region=region,
        view=_probability_label(view, view_code, reasons) if view is not None else None,
        finding=(_probability_label(finding, finding_code, reasons)
                 if finding is not None else None),
        qc_outcome=_QC_OUTCOMES.get(_key(_code_value(quality))) if quality else None,
        qc_reasons=_qc_reasons(group, _QC_REASON),
        quality_score=float(scores[0].split()[0]) if scores else None,
        frames_total=total, frames_used=used,
        out_of_distribution=False, ood_score=float(ood[0].split()[0]) if ood else None,
        needs_review=_REVIEW in evaluations, review_reasons=reasons,
        comment=next(iter(_texts(group, _COMMENT)), None),
    )


def _not_analysed_image(item: Dataset) -> ImageSummary:
    """A study-level "Image not analysed" statement."""
    image = next(c for c in _children(item) if c.ValueType == "IMAGE")
    ref = image.ReferencedSOPSequence[0]
    quality = _find(item, _IMAGE_QUALITY)
    scores = _find(item, _OOD_SCORE)
    return ImageSummary(
        sop_instance_uid=str(ref.ReferencedSOPInstanceUID),
        sop_class_uid=str(ref.ReferencedSOPClassUID),
        tracking_identifier=None, tracking_uid=None, region=None, view=None, finding=None,
        qc_outcome=_QC_OUTCOMES.get(_key(_code_value(quality[0]))) if quality else None,
        qc_reasons=_qc_reasons(item, _QC_REASON), quality_score=None, frames_total=None,
        frames_used=0, out_of_distribution=_key(_code_value(item)) == _NOT_ANALYSED_OOD,
        ood_score=_num(scores[0]) if scores else None,
        needs_review=True, review_reasons=_texts(item, _REVIEW_REASON),
        comment=None,
    )


def _name_of(item: Dataset) -> Dataset:
    name: Dataset = item.ConceptNameCodeSequence[0]
    return name


def group_scoord(group: Dataset) -> Dataset:
    """The group's Image Region (SCOORD)."""
    return next(c for c in _children(group) if c.ValueType == "SCOORD")


def _evidence_uids(ds: Dataset, keyword: str) -> tuple[str, ...]:
    return tuple(
        str(instance.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    )


def _read(ds: Dataset) -> SRSummary:
    report = MeasurementReport.from_sequence([ds], copy=False)
    images: dict[str, ImageSummary] = {}
    for group in report.get_planar_roi_measurement_groups():
        image = _analysed_image(group[0])
        if image.sop_instance_uid in images:
            logger.warning("SR %s has more than one group for %s; keeping the first",
                           ds.get("SOPInstanceUID"), image.sop_instance_uid)
            continue
        images[image.sop_instance_uid] = image
    evaluations = _find(ds, _QUALITATIVE_EVALUATIONS)
    study = evaluations[0] if evaluations else Dataset()
    for item in _find(study, _NOT_ANALYSED):
        image = _not_analysed_image(item)
        images.setdefault(image.sop_instance_uid, image)
    reviews = _find(study, _REVIEW)
    assess = _find(study, _ASSESSABILITY)
    conclusions = _find(study, _CONCLUSION)
    algorithms = tuple(
        a for a in (_algorithm(item) for item in _find(study, _MODEL_USED)) if a is not None
    )
    disclaimers = _texts(study, _DISCLAIMER)
    summaries = _texts(study, _SUMMARY)
    title = str(ds.ConceptNameCodeSequence[0].CodeMeaning)
    return SRSummary(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        title=title,
        images=MappingProxyType(images),
        conclusion=_conclusion(conclusions[0]) if conclusions else None,
        needs_review=bool(reviews),
        review_reasons=_texts(reviews[0], _REVIEW_REASON) if reviews else (),
        assessable=not assess,
        not_assessable_reasons=_texts(assess[0], _NOT_ASSESSABLE_REASON) if assess else (),
        algorithms=algorithms,
        simulated_training_data=bool(disclaimers)
        or any(a.simulated_training_data for a in algorithms),
        disclaimer=disclaimers[0] if disclaimers else None,
        summary_text=summaries[0] if summaries else None,
        evidence=_evidence_uids(ds, "CurrentRequestedProcedureEvidenceSequence"),
        predecessors=_evidence_uids(ds, "PredecessorDocumentsSequence"),
    )
