"""Read back what :func:`dicom_sr.builder.build_sr` wrote.

:func:`read_sr` is a pure function over an SR dataset (already read, e.g. by
``pydicom.dcmread``) returning an :class:`SRSummary`: per referenced source
instance the view and finding with their probabilities, the QC outcome and
reasons, the review flag and the algorithm identities. The API and the tests use
it; it understands the content tree of the builder, not arbitrary TID 1500 SRs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
_REQUIRES_REVIEW = _key(codes.REQUIRES_HUMAN_REVIEW)
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
_NUMBER_OF_FRAMES = _key(codes.NUMBER_OF_FRAMES)
_FRAMES_ANALYSED = _key(codes.FRAMES_ANALYSED)
_OOD = _key(codes.OUT_OF_DISTRIBUTION)
_OOD_SCORE = _key(codes.OOD_SCORE)
_MODEL_USED = _key(codes.MODEL_USED)
_QUALITATIVE_EVALUATIONS = _key(codes.QUALITATIVE_EVALUATIONS)
_YES = _key(codes.YES)
_PERCENT = _key(codes.PERCENT)
_QC_OUTCOMES = {_key(code): outcome for outcome, code in codes.QC_OUTCOME_CODES.items()}

_MEASUREMENT_GROUP = _key(codes.MEASUREMENT_GROUP)
_IMAGING_MEASUREMENTS = _key(codes.IMAGING_MEASUREMENTS)
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


def _label(item: Dataset) -> LabelSummary:
    value = _code_value(item)
    thresholds = _find(item, _THRESHOLD)
    threshold = _num(thresholds[0]) if thresholds else None
    algorithm = _algorithm(item)
    if _key(value) == _REQUIRES_REVIEW:
        reasons = _texts(item, _REVIEW_REASON)
        return LabelSummary(code=None, probability=None, threshold=threshold, abstained=True,
                            reason=reasons[0] if reasons else None, algorithm=algorithm)
    probabilities = _find(item, _PROBABILITY)
    return LabelSummary(
        code=CodedLabel(
            value=str(value.CodeValue),
            scheme=str(value.CodingSchemeDesignator),
            meaning=str(value.CodeMeaning),
        ),
        probability=_num(probabilities[0]) if probabilities else None,
        threshold=threshold,
        abstained=False,
        reason=None,
        algorithm=algorithm,
    )


def _source_reference(group: Dataset) -> tuple[str, str, tuple[int, int, int, int] | None]:
    for child in _children(group):
        if child.ValueType == "IMAGE":
            ref = child.ReferencedSOPSequence[0]
            return str(ref.ReferencedSOPInstanceUID), str(ref.ReferencedSOPClassUID), None
        if child.ValueType == "SCOORD":
            image = next(c for c in _children(child) if c.ValueType == "IMAGE")
            ref = image.ReferencedSOPSequence[0]
            data = [float(v) for v in child.GraphicData]
            columns, rows = data[0::2], data[1::2]
            region = (
                round(min(columns)), round(min(rows)), round(max(columns)), round(max(rows))
            )
            return str(ref.ReferencedSOPInstanceUID), str(ref.ReferencedSOPClassUID), region
    raise ValueError("measurement group references no source image")


def _qc_reason(item: Dataset) -> QCReason:
    code, _, message = str(item.TextValue).partition(": ")
    outcomes = _find(item, _QC_CHECK_OUTCOME)
    outcome = _QC_OUTCOMES[_key(_code_value(outcomes[0]))] if outcomes else QCOutcome.WARN
    return QCReason(code=code, outcome=outcome, message=message)


def _image(group: Dataset) -> ImageSummary:
    sop_uid, sop_class, region = _source_reference(group)
    tracking_ids = _texts(group, _TRACKING_ID)
    tracking_uids = [str(c.UID) for c in _find(group, _TRACKING_UID)]
    views, findings = _find(group, _IMAGE_VIEW), _find(group, _FINDING)
    qc_items = _find(group, _IMAGE_QUALITY)
    qc_outcome: QCOutcome | None = None
    qc_reasons: tuple[QCReason, ...] = ()
    quality_score: float | None = None
    if qc_items:
        qc_outcome = _QC_OUTCOMES.get(_key(_code_value(qc_items[0])))
        qc_reasons = tuple(_qc_reason(c) for c in _find(qc_items[0], _QC_REASON))
        scores = _find(qc_items[0], _QUALITY_SCORE)
        quality_score = _num(scores[0]) if scores else None
    totals, used = _find(group, _NUMBER_OF_FRAMES), _find(group, _FRAMES_ANALYSED)
    ood_items = _find(group, _OOD)
    ood_score: float | None = None
    if ood_items:
        scores = _find(ood_items[0], _OOD_SCORE)
        ood_score = _num(scores[0]) if scores else None
    reviews = _find(group, _REVIEW)
    return ImageSummary(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        tracking_identifier=tracking_ids[0] if tracking_ids else None,
        tracking_uid=tracking_uids[0] if tracking_uids else None,
        region=region,
        view=_label(views[0]) if views else None,
        finding=_label(findings[0]) if findings else None,
        qc_outcome=qc_outcome,
        qc_reasons=qc_reasons,
        quality_score=quality_score,
        frames_total=round(_num(totals[0])) if totals else None,
        frames_used=round(_num(used[0])) if used else None,
        out_of_distribution=bool(ood_items) and _key(_code_value(ood_items[0])) == _YES,
        ood_score=ood_score,
        needs_review=bool(reviews),
        review_reasons=_texts(reviews[0], _REVIEW_REASON) if reviews else (),
    )


def _evidence_uids(ds: Dataset, keyword: str) -> tuple[str, ...]:
    return tuple(
        str(instance.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    )


def _read(ds: Dataset) -> SRSummary:
    measurements = _find(ds, _IMAGING_MEASUREMENTS)
    images: dict[str, ImageSummary] = {}
    for container in measurements:
        for group in _find(container, _MEASUREMENT_GROUP):
            image = _image(group)
            if image.sop_instance_uid in images:
                logger.warning("SR %s has more than one group for %s; keeping the first",
                               ds.get("SOPInstanceUID"), image.sop_instance_uid)
                continue
            images[image.sop_instance_uid] = image

    evaluations = _find(ds, _QUALITATIVE_EVALUATIONS)
    study = evaluations[0] if evaluations else Dataset()
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
        conclusion=_label(conclusions[0]) if conclusions else None,
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
