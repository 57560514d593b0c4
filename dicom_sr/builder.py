"""Build the sononode Comprehensive 3D SR (TID 1500 Measurement Report).

A pure builder: it takes the source instance headers (already read) and the typed
:class:`~dicom_sr.model.StudyResult` and returns a :class:`pydicom.Dataset`; it reads
and writes no files. The content is laid out so that real viewers show it: OHIF draws
each analysed image's region with one line per group-level measurement
(``<concept meaning>: <value> %``) and labels it from the group's Comment; highdicom's
reader finds every group, its measurements and their TID 4019 algorithm; text readers
(DCMTK ``dsr2html``) read the sentences. Content tree::

    Imaging Measurement Report (126000, DCM)     disclaimer in the Disclaimer item, the
    ├─ Language, Device observer (one UID per    Series Description and the algorithm
    │  installation), Procedure reported          names, once each
    ├─ Imaging Measurements
    │  └─ TID 1410 group per analysed image (region on the image, frame of a loop)
    │     ├─ Tracking Identifier / Tracking Unique Identifier
    │     ├─ Image Region: the model's localisation, else the analysed scan region
    │     ├─ Finding = <finding code>, Algorithm identification (TID 4019)
    │     ├─ Measurement "View: <label> (probability)" = 97.3 %  └─ TID 4019, INFERRED FROM
    │     ├─ Measurement "Finding: <label> (probability)" = 62.0 % (or "NOT CONFIDENT")
    │     ├─ Image View = <view code>, Image Quality = CID 6044, Human review
    │     ├─ Comment "<view> 97.3 % | <finding> 62.0 %" (what OHIF labels the region with)
    │     └─ Decision thresholds, Frames analysed, QC reasons, review reasons (in words)
    └─ Qualitative Evaluations
       ├─ Disclaimer, Human review + reasons, Study assessability + reasons
       ├─ Conclusion = <code>  └─ Probability (%), [Requires human review], TID 4019
       ├─ Image not analysed = <why> └─ IMAGE, reasons, one per QC-failed/OOD image
       ├─ Supersedes earlier AI report, Summary (plain text of all the above)
       └─ AI model used (TID 4019), one per model pack; each is also Contributing
          Equipment (Processing Equipment, Device UID from its sha256) per IHE AIR
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, cast

import numpy as np
from highdicom import UID as HdUID
from highdicom.base_content import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import UltrasoundImageStorage, generate_uid
from pydicom.valuerep import validate_value

from dicom_sr import codes
from dicom_sr.model import (
    AlgorithmInfo,
    Classification,
    CodedLabel,
    ImageResult,
    QCCheck,
    QCOutcome,
    StudyResult,
)

if TYPE_CHECKING:
    from highdicom.sr import ContentItem

logger = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 9001
"""Series Number of the AI report series (high, so PACS lists it after acquisitions)."""

DEFAULT_DEVICE_OBSERVER_NAME = "sononode"
"""Name of the device observer (TID 1004) when none is given."""

SERIES_DESCRIPTION = "sononode AI report"
"""Series Description of the AI report series."""

SERIES_DESCRIPTION_SIMULATED = "sononode AI report - SIMULATED DATA, NOT FOR CLINICAL USE"
"""Series Description when a model pack was trained on simulated images."""

_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type 2 attributes highdicom copies from the first evidence instance."""

_ENUMERATED = {"PatientSex": frozenset({"M", "F", "O", ""})}
"""Enumerated values of those attributes (PS3.3 C.7.1.1)."""

_REQUIRED_SOURCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")

_CONTAINS = RelationshipTypeValues.CONTAINS
_HAS_PROPERTIES = RelationshipTypeValues.HAS_PROPERTIES
_HAS_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD


def _default_software_versions() -> str:
    try:
        return f"sononode {metadata.version('sononode')}"
    except metadata.PackageNotFoundError:
        return "sononode"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def build_sr(
    sources: Sequence[Dataset],
    result: StudyResult,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    series_number: int = DEFAULT_SERIES_NUMBER,
    previous_versions: Sequence[Dataset] | None = None,
    institution_name: str | None = None,
    device_observer_name: str = DEFAULT_DEVICE_OBSERVER_NAME,
    device_observer_uid: str | None = None,
    manufacturer: str = "sononode",
    software_versions: str | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR (TID 1500) reporting ``result`` on ``sources``.

    Parameters
    ----------
    sources
        Headers of the analysed source instances (pixel data may be absent). All
        belong to the study of ``result``; every one is referenced in the Current
        Requested Procedure Evidence Sequence and the patient and study modules are
        copied from the first.
    result
        The analysis result. Every :class:`~dicom_sr.model.ImageResult` must refer to
        one of ``sources``; each becomes one measurement group.
    series_instance_uid
        Series of the report: new, not a source series. Reuse the same AI series
        when a report is superseded.
    sop_instance_uid
        SOP Instance UID of the report.
    instance_number
        Instance Number of the report within its series.
    series_number
        Series Number of the report series.
    previous_versions
        Earlier reports this one supersedes (headers suffice); referenced in the
        Predecessor Documents Sequence.
    institution_name
        Institution Name of the equipment that creates the report.
    device_observer_name
        Name of the device observer (TID 1004).
    device_observer_uid
        UID of the device observer: one per installation (the node keeps it in its data
        directory); derived from ``device_observer_name`` when None (tests).
    manufacturer
        Manufacturer (General Equipment module) and device observer manufacturer.
    software_versions
        Software Versions of the equipment; defaults to ``"sononode <version>"``.

    Returns
    -------
    pydicom.Dataset
        A highdicom :class:`~highdicom.sr.Comprehensive3DSR`, Explicit VR Little
        Endian, PRELIMINARY / UNVERIFIED / COMPLETE.

    Raises
    ------
    ValueError
        If ``sources`` is empty or lacks required attributes, mixes studies or
        differs from ``result``'s study; if an image result refers to an instance
        not among ``sources`` or repeats one; if ``result`` has no image results;
        if a UID, region, frame count or code is invalid; or if a previous version
        belongs to another study or is the report itself.
    """
    by_uid = _validate_sources(sources, result)
    _validate_uids(series_instance_uid, sop_instance_uid, sources)
    _validate_result(result, by_uid)
    if previous_versions is not None and len(previous_versions) == 0:
        previous_versions = None  # an empty Predecessor Documents Sequence is invalid
    if previous_versions is not None:
        _validate_previous_versions(previous_versions, result, sop_instance_uid)
    if instance_number < 1 or series_number < 0:
        raise ValueError(
            f"instance_number must be >= 1 and series_number >= 0, got "
            f"{instance_number} and {series_number}"
        )

    algorithms = all_algorithms(result)
    simulated = any(a.simulated_training_data for a in algorithms)

    observer_uid = device_observer_uid or generate_uid(
        entropy_srcs=["sononode-device-observer", device_observer_name]
    )
    observation_context = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=pydicom_codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=observer_uid,
                name=device_observer_name,
                manufacturer_name=manufacturer,
                model_name="sononode",
            ),
        )
    )
    groups = [
        _measurement_group(image, by_uid[image.sop_instance_uid], index, result.assessable)
        for index, image in enumerate(result.images, start=1) if is_analysed(image)
    ]
    try:
        report = MeasurementReport(
            observation_context=observation_context,
            procedure_reported=codes.PROCEDURE_ULTRASOUND,
            # highdicom requires one group at least; a study without an analysed image
            # gets the placeholder removed below (TID 1500 allows a report of
            # qualitative evaluations only).
            imaging_measurements=groups or [_placeholder_group(result, by_uid)],
            title=codes.TITLE,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot build the TID 1500 measurement report: {exc}") from exc
    if not groups:
        root = report[0].ContentSequence
        placeholder = _key_of(codes.IMAGING_MEASUREMENTS)
        for index in reversed(range(len(root))):
            if _key_of(root[index].ConceptNameCodeSequence[0]) == placeholder:
                del root[index]
    report[0].ContentSequence.append(
        _study_evaluations(result, algorithms, simulated, by_uid, previous_versions or ()))

    header = _evidence_header(sources[0])
    evidence = [header, *sources[1:]]
    try:
        sr = Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            previous_versions=previous_versions,
            series_description=(
                SERIES_DESCRIPTION_SIMULATED if simulated else SERIES_DESCRIPTION
            ),
            manufacturer_model_name="sononode",
            software_versions=software_versions or _default_software_versions(),
            contributing_equipment=[_contributing_equipment(a) for a in algorithms],
            # Every private scheme the SR uses is identified (PS3.3 C.12.1.1.2).
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=codes.PRIVATE_SCHEME,
                    name=codes.PRIVATE_SCHEME_NAME,
                    responsible_organization=manufacturer,
                ),
                CodingSchemeIdentificationItem(
                    designator=codes.IHE_SCHEME,
                    name=codes.IHE_SCHEME_NAME,
                    responsible_organization="IHE International",
                ),
            ],
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot build the Comprehensive 3D SR: {exc}") from exc
    _separate(sr)
    logger.debug(
        "built SR %s for study %s (%d image groups, needs_review=%s, simulated=%s)",
        sop_instance_uid, result.study_instance_uid, len(groups), result.needs_review,
        simulated,
    )
    return sr


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def _validate_sources(sources: Sequence[Dataset], result: StudyResult) -> dict[str, Dataset]:
    if len(sources) == 0:
        raise ValueError("sources is empty: an SR needs at least one analysed source instance")
    by_uid: dict[str, Dataset] = {}
    for position, source in enumerate(sources):
        if not isinstance(source, Dataset):
            raise TypeError(
                f"sources[{position}] must be a pydicom Dataset, got {type(source).__name__}"
            )
        missing = [kw for kw in _REQUIRED_SOURCE if not source.get(kw)]
        if missing:
            raise ValueError(f"sources[{position}] lacks required attribute(s) {missing}")
        uid = str(source.SOPInstanceUID)
        if uid in by_uid:
            raise ValueError(f"sources[{position}] repeats SOP Instance UID {uid}")
        if str(source.StudyInstanceUID) != result.study_instance_uid:
            raise ValueError(
                f"sources[{position}] ({uid}) belongs to study {source.StudyInstanceUID}, "
                f"not to the result's study {result.study_instance_uid}"
            )
        by_uid[uid] = source
    return by_uid


def _validate_uids(series_uid: str, sop_uid: str, sources: Sequence[Dataset]) -> None:
    for name, value in (("series_instance_uid", series_uid), ("sop_instance_uid", sop_uid)):
        if not isinstance(value, str) or not _UID_PATTERN.fullmatch(value) or len(value) > 64:
            raise ValueError(f"{name} is not a valid UID: {value!r}")
    source_series = {str(s.SeriesInstanceUID) for s in sources}
    if series_uid in source_series:
        raise ValueError(
            f"series_instance_uid {series_uid} is a source series; the SR needs its own series"
        )
    if sop_uid in {str(s.SOPInstanceUID) for s in sources}:
        raise ValueError(f"sop_instance_uid {sop_uid} is the UID of a source instance")


def _validate_result(result: StudyResult, by_uid: dict[str, Dataset]) -> None:
    if len(result.images) == 0:
        raise ValueError(
            f"result for study {result.study_instance_uid} has no image results; "
            "an SR needs at least one measurement group"
        )
    seen: set[str] = set()
    for image in result.images:
        uid = image.sop_instance_uid
        if uid in seen:
            raise ValueError(f"result has more than one image result for instance {uid}")
        seen.add(uid)
        source = by_uid.get(uid)
        if source is None:
            raise ValueError(
                f"result references instance {uid}, which is not among the "
                f"{len(by_uid)} source instance(s)"
            )
        if image.sop_class_uid != str(source.SOPClassUID):
            raise ValueError(
                f"image result {uid} has SOP Class UID {image.sop_class_uid}, "
                f"but the source instance has {source.SOPClassUID}"
            )
        if image.frames_total < 1 or not 0 <= image.frames_used <= image.frames_total:
            raise ValueError(
                f"image result {uid}: frames_used={image.frames_used} and "
                f"frames_total={image.frames_total} must satisfy "
                "0 <= frames_used <= frames_total and frames_total >= 1"
            )
        if image.region is not None:
            _validate_region(image.region, source, uid)
        for classification in (image.view, image.finding):
            if classification is not None:
                _validate_classification(classification, f"image result {uid}")
    if result.conclusion is not None:
        _validate_classification(result.conclusion, "study conclusion")


def _validate_region(region: tuple[int, ...], source: Dataset, uid: str) -> None:
    if len(region) != 4:
        raise ValueError(
            f"image result {uid}: region must be (column0, row0, column1, row1), got {region!r}"
        )
    c0, r0, c1, r1 = region
    if not (0 <= c0 < c1 and 0 <= r0 < r1):
        raise ValueError(
            f"image result {uid}: region {region!r} must satisfy 0 <= column0 < column1 "
            "and 0 <= row0 < row1"
        )
    columns, rows = source.get("Columns"), source.get("Rows")
    if columns is not None and rows is not None and (c1 > columns or r1 > rows):
        raise ValueError(
            f"image result {uid}: region {region!r} exceeds the {columns}x{rows} image"
        )


def _validate_classification(classification: Classification, where: str) -> None:
    label = classification.code
    if len(label.meaning) > 64 or len(label.value) > 16:
        raise ValueError(
            f"{where}: code {label.value!r} / {label.meaning!r} of task "
            f"{classification.task!r} exceeds DICOM limits (value 16, meaning 64 characters)"
        )
    if classification.abstained and not (classification.reason or "").strip():
        raise ValueError(
            f"{where}: abstained {classification.task!r} classification needs a reason"
        )


def _validate_previous_versions(
    previous: Sequence[Dataset], result: StudyResult, sop_uid: str
) -> None:
    for position, dataset in enumerate(previous):
        missing = [kw for kw in _REQUIRED_SOURCE if not dataset.get(kw)]
        if missing:
            raise ValueError(f"previous_versions[{position}] lacks attribute(s) {missing}")
        if str(dataset.StudyInstanceUID) != result.study_instance_uid:
            raise ValueError(
                f"previous_versions[{position}] ({dataset.SOPInstanceUID}) belongs to study "
                f"{dataset.StudyInstanceUID}, not to {result.study_instance_uid}"
            )
        if str(dataset.SOPInstanceUID) == sop_uid:
            raise ValueError(
                f"previous_versions[{position}] is the report being built ({sop_uid})"
            )


# --------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------
def all_algorithms(result: StudyResult) -> list[AlgorithmInfo]:
    """Algorithms of the result, then any only named by a classification, in order."""
    found: list[AlgorithmInfo] = list(dict.fromkeys(result.algorithms))
    classifications: list[Classification | None] = [result.conclusion]
    for image in result.images:
        classifications.extend((image.view, image.finding))
    for classification in classifications:
        if classification is not None and classification.algorithm not in found:
            found.append(classification.algorithm)
    return found


def algorithm_name(algorithm: AlgorithmInfo) -> str:
    """Return the TID 4019 Algorithm Name written for ``algorithm``.

    Parameters
    ----------
    algorithm
        The model pack identity.

    Returns
    -------
    str
        ``algorithm.name``, followed by :data:`dicom_sr.codes.SIMULATED_SUFFIX`
        when the pack was trained on simulated images.
    """
    if algorithm.simulated_training_data:
        return algorithm.name + codes.SIMULATED_SUFFIX
    return algorithm.name


def _algorithm_id(algorithm: AlgorithmInfo) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm_name(algorithm),
        version=algorithm.version,
        parameters=[f"sha256={algorithm.sha256}"],
        family=codes.ALGORITHM_FAMILY,
    )


def _code(name: CodedConcept, value: CodedConcept, relationship: RelationshipTypeValues,
          children: Iterable[Dataset] = ()) -> CodeContentItem:
    item = CodeContentItem(name=name, value=value, relationship_type=relationship)
    _attach(item, children)
    return item


def _text(name: CodedConcept, value: str, relationship: RelationshipTypeValues,
          children: Iterable[Dataset] = ()) -> TextContentItem:
    item = TextContentItem(name=name, value=value, relationship_type=relationship)
    _attach(item, children)
    return item


def _num(name: CodedConcept, value: float, unit: CodedConcept,
         relationship: RelationshipTypeValues) -> NumContentItem:
    return NumContentItem(name=name, value=value, unit=unit, relationship_type=relationship)


def _attach(item: ContentItem, children: Iterable[Dataset]) -> None:
    # Templates iterate as pydicom Datasets but hold highdicom ContentItems.
    sequence = ContentSequence(cast("list[ContentItem]", list(children)))
    if len(sequence) > 0:
        item.ContentSequence = sequence


def _percent(probability: float) -> float:
    """A probability as a percentage rounded to 0.1 %: what the figure can mean."""
    return round(probability * 100.0, 1)


def in_words(reason: str) -> str:
    """A reason as a sentence for the radiologist."""
    text = reason.strip()
    if text.startswith("QC failed: "):
        text = "Failed quality control: " + text.removeprefix("QC failed: ")
    return text[:1].upper() + text[1:]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t))


def is_analysed(image: ImageResult) -> bool:
    """True when the models gave the image a result the report shows on it: frames were
    analysed, a view was decided, and the input was not out of distribution."""
    return image.frames_used > 0 and image.view is not None and not image.out_of_distribution


def _rectangle(image: ImageResult, source: Dataset) -> np.ndarray:
    """The group's region: the model's localisation, else the analysed scan region, else
    the whole image, as a closed POLYLINE."""
    if image.region is not None:
        c0, r0, c1, r1 = image.region
    else:
        c0, r0, c1, r1 = 0, 0, int(source.get("Columns") or 1), int(source.get("Rows") or 1)
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)


def _source_for_region(image: ImageResult, source: Dataset) -> SourceImageForRegion:
    frames = [image.key_frame] if image.key_frame is not None else None
    return SourceImageForRegion(referenced_sop_class_uid=str(source.SOPClassUID),
                                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                                referenced_frame_numbers=frames)


def _probability(classification: Classification) -> Measurement:
    """A label's calibrated probability as a group-level measurement (TID 300) that names
    the label and carries its algorithm (TID 4019) and decision threshold. (TID 1410 does
    not allow a measurement its own SCOORD: it is about the group's region.)"""
    measurement = Measurement(
        name=codes.probability_concept(classification.task, classification.code.meaning,
                                       confident=not classification.abstained),
        value=_percent(classification.probability),
        unit=codes.PERCENT,
        algorithm_id=_algorithm_id(classification.algorithm),
    )
    if classification.threshold is not None:
        measurement[0].ContentSequence.append(
            _num(codes.DECISION_THRESHOLD, _percent(classification.threshold), codes.PERCENT,
                 _HAS_PROPERTIES))
    return measurement


def label_text(classification: Classification) -> str:
    """A result as a reader sees it: ``"Thyroid transverse view 97.3 %"``."""
    text = f"{classification.code.meaning} {_percent(classification.probability):.1f} %"
    return text + (" (not confident)" if classification.abstained else "")


def _tracking_identifier(image: ImageResult, source: Dataset, index: int) -> TrackingIdentifier:
    series, number = source.get("SeriesNumber"), source.get("InstanceNumber")
    readable = (f"US image {series}/{number}" if series is not None and number is not None
                else f"US image {index}")
    return TrackingIdentifier(uid=HdUID(tracking_uid(image.sop_instance_uid)),
                              identifier=readable)


def tracking_uid(sop_instance_uid: str) -> str:
    """The Tracking UID of the measurement group of an image: derived from the instance, so
    a superseding SR tracks the same image under the same UID, and feedback that names it
    (``POST /feedback``) finds the image without reading the SR."""
    return str(generate_uid(entropy_srcs=["sononode-tracking", sop_instance_uid]))


def _measurement_group(image: ImageResult, source: Dataset, index: int,
                       assessable: bool) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for an analysed image: a region on the image (the model's localisation,
    else the scan region it analysed, said so in the comment), the view's and the
    finding's probabilities as group-level measurements, the standard qualitative
    evaluations, and the review statement."""
    assert image.view is not None
    polygon = _rectangle(image, source)
    region_source = _source_for_region(image, source)
    shown = [image.view]
    finding = image.finding if image.finding is not None and assessable else None
    if finding is not None:
        shown.append(finding)
    evaluations = [QualitativeEvaluation(codes.IMAGE_VIEW, _label_code(image.view)),
                   QualitativeEvaluation(codes.IMAGE_QUALITY,
                                         codes.QC_OUTCOME_CODES[image.qc_outcome])]
    if image.needs_review:
        evaluations.append(QualitativeEvaluation(codes.HUMAN_REVIEW,
                                                 codes.REQUIRES_HUMAN_REVIEW))
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking_identifier(image, source, index),
        referenced_region=ImageRegion(graphic_type=GraphicTypeValues.POLYLINE,
                                      graphic_data=polygon, source_image=region_source),
        finding_type=_label_code(finding) if finding is not None else None,
        algorithm_id=_algorithm_id(image.view.algorithm),
        measurements=[_probability(c) for c in shown],
        qualitative_evaluations=evaluations,
    )
    content = group[0].ContentSequence
    comment = " | ".join(label_text(c) for c in shown)
    if not image.region_localised:
        comment += " (region: the analysed scan sector, not a lesion outline)"
    content.append(_text(codes.COMMENT, comment, _CONTAINS))
    frames = f"{image.frames_used} of {image.frames_total}"
    if image.key_frame is not None:
        frames += f" (region shown on frame {image.key_frame})"
    content.append(_text(codes.FRAMES_TEXT, frames, _CONTAINS))
    content.extend(_qc_reason(check, _CONTAINS) for check in image.qc_checks
                   if check.outcome is not QCOutcome.PASS)
    if image.quality_score is not None:
        # TEXT, not NUM: viewers print every group-level NUM on the image.
        content.append(_text(codes.QUALITY_SCORE,
                             f"{float(image.quality_score):.2f} (0 = unusable, 1 = ideal)",
                             _CONTAINS))
    if image.ood_score is not None:
        # TEXT for the same reason: the detector's score of an image within distribution.
        content.append(_text(codes.OOD_SCORE, f"{float(image.ood_score):.2f}", _CONTAINS))
    for reason in _unique(in_words(r) for r in image.review_reasons):
        content.append(_text(codes.REVIEW_REASON, reason, _CONTAINS))
    return group


def _key_of(code: Dataset) -> tuple[str, str]:
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _placeholder_group(result: StudyResult,
                       by_uid: dict[str, Dataset]) -> MeasurementsAndQualitativeEvaluations:
    source = by_uid[result.images[0].sop_instance_uid]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=HdUID(generate_uid()), identifier="none"),
        source_images=[SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID))])


def _qc_reason(check: QCCheck, relationship: RelationshipTypeValues) -> TextContentItem:
    """A QC check that did not pass, in words, with its outcome."""
    return _text(codes.QC_REASON, in_words(check.message), relationship,
                 [_code(codes.QC_CHECK_OUTCOME, codes.QC_OUTCOME_CODES[check.outcome],
                        _HAS_CONCEPT_MOD)])


def _label_code(classification: Classification) -> CodedConcept:
    return CodedConcept(value=classification.code.value,
                        scheme_designator=classification.code.scheme,
                        meaning=classification.code.meaning)


def _not_analysed_item(image: ImageResult, source: Dataset) -> CodeContentItem:
    """A study-level statement about an image the models gave no result for, with a
    reference to the image: every reader handles it (no measurement group without a
    region, which makes OHIF's loader throw)."""
    if image.out_of_distribution:
        value = codes.NOT_ANALYSED_OOD
    elif image.qc_outcome is QCOutcome.FAIL:
        value = codes.NOT_ANALYSED_QC
    else:
        value = codes.NOT_ANALYSED_NO_FRAME
    children: list[Dataset] = [ImageContentItem(
        name=codes.SOURCE_IMAGE, referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        relationship_type=_HAS_PROPERTIES)]
    children += [_text(codes.REVIEW_REASON, r, _HAS_PROPERTIES)
                 for r in _unique(in_words(r) for r in image.review_reasons)]
    children += [_qc_reason(check, _HAS_PROPERTIES) for check in image.qc_checks
                 if check.outcome is not QCOutcome.PASS]
    children.append(_code(codes.IMAGE_QUALITY, codes.QC_OUTCOME_CODES[image.qc_outcome],
                          _HAS_PROPERTIES))
    if image.ood_score is not None:
        children.append(_num(codes.OOD_SCORE, round(float(image.ood_score), 2),
                             codes.NO_UNITS, _HAS_PROPERTIES))
    return _code(codes.NOT_ANALYSED, value, _CONTAINS, children)


def _conclusion_item(conclusion: Classification) -> CodeContentItem:
    """The study conclusion with its probability; when the node is not confident, its
    best guess still, marked as requiring review."""
    children: list[Dataset] = [
        _num(codes.PROBABILITY, _percent(conclusion.probability), codes.PERCENT,
             _HAS_PROPERTIES)]
    if conclusion.threshold is not None:
        children.append(_num(codes.DECISION_THRESHOLD, _percent(conclusion.threshold),
                             codes.PERCENT, _HAS_PROPERTIES))
    if conclusion.abstained:
        children.append(_code(codes.HUMAN_REVIEW, codes.REQUIRES_HUMAN_REVIEW,
                              _HAS_PROPERTIES,
                              [_text(codes.REVIEW_REASON, in_words(conclusion.reason or
                                                                 "not confident"),
                                     _HAS_PROPERTIES)]))
    children.extend(_algorithm_id(conclusion.algorithm))
    return _code(codes.CONCLUSION, _label_code(conclusion), _CONTAINS, children)


def _review_item(reasons: Sequence[str]) -> CodeContentItem:
    return _code(
        codes.HUMAN_REVIEW,
        codes.REQUIRES_HUMAN_REVIEW,
        _CONTAINS,
        [_text(codes.REVIEW_REASON, r, _HAS_PROPERTIES)
         for r in _unique(in_words(r) for r in reasons) or ["Unspecified"]],
    )


def not_assessable_reasons(result: StudyResult) -> list[str]:
    """Return the reasons a study is not assessable, most specific first, deduplicated.

    Parameters
    ----------
    result
        The study result; only meaningful when ``result.assessable`` is False.

    Returns
    -------
    list of str
        The study's review reasons followed by the messages of failed QC checks, in words.
    """
    reasons = [in_words(r) for r in result.review_reasons]
    for image in result.images:
        reasons.extend(in_words(check.message) for check in image.qc_checks
                       if check.outcome is QCOutcome.FAIL)
    return _unique(reasons) or ["No image passed quality control"]


def _summary_text(result: StudyResult, previous: Sequence[Dataset]) -> str:
    lines: list[str] = []
    if previous:
        lines.append("This report supersedes the earlier AI report(s) "
                     + ", ".join(str(d.SOPInstanceUID) for d in previous) + ".")
    if result.needs_review:
        lines.append("REQUIRES HUMAN REVIEW: " + "; ".join(
            _unique(in_words(r) for r in result.review_reasons) or ["unspecified"]))
    if not result.assessable:
        lines.append("Study NOT ASSESSABLE by the AI models: "
                     + "; ".join(not_assessable_reasons(result)))
    conclusion = result.conclusion
    if conclusion is not None and result.assessable:
        if conclusion.abstained:
            lines.append(f"AI conclusion (NOT CONFIDENT, requires review): "
                         f"{label_text(conclusion)}; {in_words(conclusion.reason or '')}")
        else:
            lines.append(f"AI conclusion: {label_text(conclusion)}")
    analysed = sum(1 for image in result.images if is_analysed(image))
    lines.append(f"{analysed} of {len(result.images)} image(s) analysed; results are "
                 "preliminary and unverified.")
    return "\n".join(lines)


def _study_evaluations(result: StudyResult, algorithms: Sequence[AlgorithmInfo],
                       simulated: bool, by_uid: dict[str, Dataset],
                       previous: Sequence[Dataset]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS
    )
    items: list[Dataset] = []
    if simulated:
        items.append(_text(codes.DISCLAIMER, codes.SIMULATED_DISCLAIMER, _CONTAINS))
    # Review and assessability first: the statements a radiologist must not miss.
    if result.needs_review:
        items.append(_review_item(result.review_reasons))
    if not result.assessable:
        items.append(
            _code(codes.ASSESSABILITY, codes.NOT_ASSESSABLE, _CONTAINS,
                  [_text(codes.NOT_ASSESSABLE_REASON, r, _HAS_PROPERTIES)
                   for r in not_assessable_reasons(result)])
        )
    if result.conclusion is not None and result.assessable:
        items.append(_conclusion_item(result.conclusion))
    items.extend(_not_analysed_item(image, by_uid[image.sop_instance_uid])
                 for image in result.images if not is_analysed(image))
    if previous:
        items.append(_text(codes.SUPERSEDES, ", ".join(str(d.SOPInstanceUID)
                                                     for d in previous), _CONTAINS))
    items.append(_text(codes.SUMMARY, _summary_text(result, previous), _CONTAINS))
    for algorithm in algorithms:
        items.append(
            _code(codes.MODEL_USED, codes.ALGORITHM_FAMILY, _CONTAINS, _algorithm_id(algorithm))
        )
    _attach(container, items)
    return container


def _separate(item: Dataset) -> None:
    """Every container holds separate statements (not one sentence in parts), so text
    renderers give each item its name instead of running the values together."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def device_uid(algorithm: AlgorithmInfo) -> str:
    """Device UID of a model pack (IHE AIR): derived from its sha256, so it changes with
    every pack and is the same on every node that runs that pack."""
    return str(generate_uid(entropy_srcs=["sononode-model-pack", algorithm.sha256]))


def _contributing_equipment(algorithm: AlgorithmInfo) -> ContributingEquipment:
    """The model pack as Contributing Equipment (processing equipment), per IHE AIR."""
    equipment = ContributingEquipment(
        manufacturer="sononode",
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm_name(algorithm)[:64],
        software_versions=algorithm.version,
        contribution_description=f"AI model pack, sha256 {algorithm.sha256}",
    )
    # highdicom accepts only CID 7005 codes, which do not hold IHE AIR's yet: replace the
    # one item after it checked the rest.
    equipment.PurposeOfReferenceCodeSequence = [codes.AIR_PROCESSING_ALGORITHM]
    equipment.DeviceUID = device_uid(algorithm)
    return equipment


def _evidence_header(first: Dataset) -> Dataset:
    """The identity and the patient and study modules of the first source, for highdicom.

    highdicom copies these from the first evidence instance and needs them present and
    valid; a modality's header may hold a value of the wrong VR, an unparseable date or
    bytes invalid in its character set. Each attribute is copied only when it reads and
    validates as its standard VR, else left empty (all are Type 2): one malformed
    attribute must not cost the study its report. Text is kept as decoded, in UTF-8.
    """
    header = Dataset()
    for keyword in _REQUIRED_SOURCE:
        setattr(header, keyword, str(first.get(keyword)))
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(header, keyword, _valid_value(first, keyword))
    texts = [str(header.get(keyword, "")) for keyword in _PATIENT_STUDY_TYPE2]
    if any(not text.isascii() for text in texts):
        header.SpecificCharacterSet = "ISO_IR 192"
    return header


def _valid_value(source: Dataset, keyword: str) -> object:
    """The value of ``keyword`` in ``source`` if it is a valid value of its standard VR."""
    if keyword not in source:
        return ""
    vr = dictionary_VR(keyword)
    try:
        element = source[keyword]  # converting a raw element may raise
        value = element.value
        if vr != element.VR:
            raise ValueError(f"VR {element.VR} instead of {vr}")
        if element.VM > 1:
            raise ValueError(f"{element.VM} values where one is allowed")
        if vr == "PN":
            value = str(value)
        validate_value(vr, value, config.RAISE)
        allowed = _ENUMERATED.get(keyword)
        if allowed is not None and value not in allowed:
            raise ValueError(f"not one of {sorted(allowed)}")
    except Exception as exc:
        # The message names the attribute, never its value (it may be a patient's name).
        logger.warning("source %s: %s is malformed (%s); left empty in the report",
                       source.get("SOPInstanceUID"), keyword, type(exc).__name__)
        return ""
    return value if value is not None else ""


def warm_up() -> None:
    """Build and discard an SR for a one-image study, with no patient in it.

    The first SR a process builds costs about half a second more than the next ones
    (pydicom's and highdicom's dictionaries and caches filled on first use); a worker
    process calls this once at start, as it loads its models, so that the first study it
    reports is not the slow one.
    """
    source = Dataset()
    source.SOPClassUID = UltrasoundImageStorage
    source.SOPInstanceUID = generate_uid()
    source.StudyInstanceUID = generate_uid()
    source.SeriesInstanceUID = generate_uid()
    source.Modality = "US"
    algorithm = AlgorithmInfo(name="warm-up", version="0", sha256="0" * 64)
    label = CodedLabel("WARMUP", codes.PRIVATE_SCHEME, "Warm-up")
    view = Classification(task="view", label="warm_up", code=label, probability=0.5,
                          algorithm=algorithm, threshold=0.6, abstained=True,
                          reason="warm-up")
    result = StudyResult(
        study_instance_uid=source.StudyInstanceUID,
        images=(ImageResult(sop_instance_uid=source.SOPInstanceUID,
                            sop_class_uid=source.SOPClassUID, qc_outcome=QCOutcome.PASS,
                            frames_used=1, view=view, region=(0, 0, 8, 8),
                            needs_review=True, review_reasons=("warm-up",)),),
        algorithms=(algorithm,), needs_review=True, review_reasons=("warm-up",))
    sr = build_sr([source], result, series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())
    sr.save_as(io.BytesIO(), enforce_file_format=True)
