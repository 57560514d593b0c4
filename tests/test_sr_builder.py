"""build_sr: document header, content tree, provenance, disclaimers and input validation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sr_fixtures as fx
from highdicom.sr import CodedConcept, Comprehensive3DSR
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr import build_sr, codes
from dicom_sr.builder import SERIES_DESCRIPTION_SIMULATED, in_words
from dicom_sr.model import CodedLabel, QCOutcome, StudyResult


def _build(sources: list[Dataset], result: StudyResult, **kw: Any) -> Dataset:
    kw.setdefault("series_instance_uid", generate_uid())
    kw.setdefault("sop_instance_uid", generate_uid())
    return build_sr(sources, result, **kw)


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _named(ds: Dataset, concept: CodedConcept) -> list[Dataset]:
    return [
        i for i in _walk(ds)
        if i.ConceptNameCodeSequence[0].CodeValue == concept.value
        and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == concept.scheme_designator
    ]


def _groups(ds: Dataset) -> list[Dataset]:
    return [i for i in _walk(ds) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]


@pytest.fixture
def sources() -> list[Dataset]:
    return fx.make_sources()


def test_header_copies_patient_and_study_and_uses_new_series(sources: list[Dataset]) -> None:
    series, sop = generate_uid(), generate_uid()
    sr = _build(sources, fx.normal_result(sources), series_instance_uid=series,
                sop_instance_uid=sop, instance_number=3, institution_name="General Hospital")
    assert isinstance(sr, Comprehensive3DSR)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.InstanceNumber) == (series, sop, 3)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate"):
        assert sr[keyword].value == sources[0][keyword].value
    assert sr.InstitutionName == "General Hospital"
    assert sr.Manufacturer == "sononode"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SONONODE"


def test_every_private_coding_scheme_used_is_identified(sources: list[Dataset]) -> None:
    """PS3.3 C.12.1.1.2: a private scheme (``99`` prefix) a code uses anywhere in the SR,
    the IHE AIR Purpose of Reference included, is listed with its name."""
    sr = _build(sources, fx.review_result(sources))
    used: set[str] = set()

    def walk(ds: Dataset) -> None:
        for element in ds:
            if element.keyword == "CodingSchemeDesignator":
                used.add(str(element.value))
            elif element.VR == "SQ" and element.keyword != "CodingSchemeIdentificationSequence":
                for item in element.value:
                    walk(item)

    walk(sr)
    declared = {item.CodingSchemeDesignator: item.CodingSchemeName
                for item in sr.CodingSchemeIdentificationSequence}
    private = {scheme for scheme in used if scheme.startswith("99")}
    assert private == {"99SONONODE", "99IHE"}
    assert private <= set(declared) and all(declared[s] for s in private)


def test_evidence_references_every_source(sources: list[Dataset]) -> None:
    sr = _build(sources, fx.normal_result(sources))
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    referenced = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
        for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence
    }
    assert referenced == {(s.SOPClassUID, s.SOPInstanceUID) for s in sources}


def test_evidence_includes_sources_without_an_image_result(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    result = dataclasses.replace(result, images=result.images[:1])
    sr = _build(sources, result)
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert sum(len(s.ReferencedSOPSequence) for s in study.ReferencedSeriesSequence) == 3
    assert len(_groups(sr)) == 1


def test_one_group_per_analysed_image_with_a_region_and_source_reference(
    sources: list[Dataset],
) -> None:
    """TID 1410 for every analysed image (a group without a region breaks OHIF): the
    model's localisation when it has one, else the analysed scan region, said so."""
    sr = _build(sources, fx.normal_result(sources))
    groups = _groups(sr)
    assert len(groups) == 3
    for group, source in zip(groups, sources, strict=True):
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        names = [c.ConceptNameCodeSequence[0].CodeValue for c in group.ContentSequence]
        assert "112039" in names and "112040" in names  # tracking id and uid
        (region,) = [c for c in group.ContentSequence if c.ValueType == "SCOORD"]
        assert region.GraphicType == "POLYLINE"
        refs = [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for r in _walk(region) if r.ValueType == "IMAGE"]
        assert refs == [source.SOPInstanceUID]
    (region,) = [c for c in groups[0].ContentSequence if c.ValueType == "SCOORD"]
    assert [float(v) for v in region.GraphicData] == [40, 30, 600, 30, 600, 450, 40, 450, 40, 30]
    (comment,) = _named(groups[0], codes.COMMENT)
    assert comment.TextValue.startswith("Four chamber view 93.0 % | Normal 87.0 %")
    assert "analysed scan sector, not a lesion outline" in comment.TextValue


def test_tracking_uid_is_stable_across_versions(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    uids = [
        [i.UID for i in _named(_build(sources, result), CodedConcept(
            "112040", "DCM", "Tracking Unique Identifier"))]
        for _ in range(2)
    ]
    assert uids[0] == uids[1] and len(set(uids[0])) == 3


def test_every_model_output_carries_algorithm_identification(sources: list[Dataset]) -> None:
    """TID 4019 on every probability measurement, on every group and on the conclusion."""
    sr = _build(sources, fx.normal_result(sources))
    probabilities = [i for i in _walk(sr) if i.ValueType == "NUM"
                     and i.ConceptNameCodeSequence[0].CodeMeaning.endswith("(probability)")]
    model_items = probabilities + _groups(sr) + _named(sr, codes.CONCLUSION)
    assert len(probabilities) == 3 + 3
    for item in model_items:
        children = {c.ConceptNameCodeSequence[0].CodeValue: c for c in item.ContentSequence}
        assert {"111001", "111003", "111002"} <= set(children)
        assert children["111002"].TextValue.startswith("sha256=")
        assert children["111002"].TextValue[7:] in {"a" * 64, "b" * 64}


def test_probability_is_a_group_level_measurement_in_percent(sources: list[Dataset]) -> None:
    """What OHIF prints on the region: '<task>: <label> (probability): 93.0 %'."""
    sr = _build(sources, fx.normal_result(sources))
    group = _groups(sr)[0]
    nums = [c for c in group.ContentSequence if c.ValueType == "NUM"]
    assert [n.ConceptNameCodeSequence[0].CodeMeaning for n in nums] == [
        "View: Four chamber view (probability)", "Finding: Normal (probability)"]
    value = nums[0].MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(93.0)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    (view,) = _named(group, codes.IMAGE_VIEW)
    assert view.ConceptCodeSequence[0].CodeValue == fx.FOUR_CHAMBER.value


def test_a_finding_below_threshold_keeps_its_best_guess_marked_not_confident(
    sources: list[Dataset],
) -> None:
    result = fx.review_result(sources)
    sr = _build(sources, result)
    group = _groups(sr)[1]
    nums = [c.ConceptNameCodeSequence[0].CodeMeaning for c in group.ContentSequence
            if c.ValueType == "NUM"]
    assert "Finding: Abnormal (NOT CONFIDENT, review)" in nums
    (comment,) = _named(group, codes.COMMENT)
    assert "Abnormal 41.0 % (not confident)" in comment.TextValue
    reasons = [c.TextValue for c in _named(group, codes.REVIEW_REASON)]
    assert reasons == ["Low confidence: 0.41 below threshold 0.70"]
    (review,) = [q for q in _named(group, codes.HUMAN_REVIEW)]
    assert review.ConceptCodeSequence[0].CodeValue == codes.REQUIRES_HUMAN_REVIEW.value


def test_study_review_statement_is_coded_and_textual(sources: list[Dataset]) -> None:
    sr = _build(sources, fx.review_result(sources))
    study_reviews = [i for i in _named(sr, codes.HUMAN_REVIEW)
                     if "ContentSequence" in i and "Image 2" in i.ContentSequence[0].TextValue]
    assert len(study_reviews) == 1
    assert study_reviews[0].ConceptCodeSequence[0].CodeMeaning == "Requires human review"
    (summary,) = _named(sr, codes.SUMMARY)
    assert summary.TextValue.startswith("REQUIRES HUMAN REVIEW: Image 2: low confidence")
    (conclusion,) = _named(sr, codes.CONCLUSION)
    # The best guess stays, with its probability, marked as requiring review.
    assert conclusion.ConceptCodeSequence[0].CodeValue == fx.ABNORMAL.value
    assert _named(conclusion, codes.REQUIRES_HUMAN_REVIEW) or [
        c for c in conclusion.ContentSequence
        if c.ConceptNameCodeSequence[0].CodeValue == codes.HUMAN_REVIEW.value]


def test_a_qc_failed_image_is_a_study_level_statement_with_its_reasons(
    sources: list[Dataset],
) -> None:
    """No measurement group without a region (OHIF's loader throws on one): the image is
    'not analysed', with a reference to it and the reasons in words."""
    result = fx.qc_failed_result(sources)
    sr = _build(sources, result)
    assert len(_groups(sr)) == 2
    (item,) = _named(sr, codes.NOT_ANALYSED)
    assert item.ConceptCodeSequence[0].CodeValue == codes.NOT_ANALYSED_QC.value
    (image,) = [c for c in item.ContentSequence if c.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    texts = [c for c in item.ContentSequence if c.ValueType == "TEXT"]
    qc = [c for c in texts if c.ConceptNameCodeSequence[0].CodeValue == codes.QC_REASON.value]
    checks = [c for c in result.images[0].qc_checks if c.outcome is not QCOutcome.PASS]
    assert [c.TextValue for c in qc] == [in_words(c.message) for c in checks]  # warnings too
    assert "62% of pixels saturated" in [c.TextValue for c in qc]
    for item, check in zip(qc, checks, strict=True):
        (outcome,) = item.ContentSequence
        assert outcome.ConceptCodeSequence[0].CodeValue == (
            codes.QC_OUTCOME_CODES[check.outcome].value)
    assert all(c.TextValue != qc[0].TextValue for c in texts if c not in qc), "said twice"
    (summary,) = _named(sr, codes.SUMMARY)
    assert "2 of 3 image(s) analysed" in summary.TextValue


def test_not_assessable_study_presents_no_finding(sources: list[Dataset]) -> None:
    result = fx.not_assessable_result(sources)
    # even a stray finding from a worker must not be presented
    images = (dataclasses.replace(result.images[0], finding=fx.finding()), *result.images[1:])
    result = dataclasses.replace(result, images=images, conclusion=fx.finding())
    sr = _build(sources, result)
    assert not _named(sr, codes.FINDING)
    assert not _named(sr, codes.CONCLUSION)
    assert not _groups(sr) and not _named(sr, codes.IMAGING_MEASUREMENTS)
    (assess,) = _named(sr, codes.ASSESSABILITY)
    assert assess.ConceptCodeSequence[0].CodeValue == codes.NOT_ASSESSABLE.value
    reasons = [c.TextValue for c in assess.ContentSequence]
    assert "All frames are blank" in reasons
    assert len(_named(sr, codes.NOT_ANALYSED)) == 3
    (summary,) = _named(sr, codes.SUMMARY)
    assert "NOT ASSESSABLE" in summary.TextValue and "0 of 3 image(s) analysed" in summary.TextValue


def test_simulated_training_data_disclaimer_once_each(sources: list[Dataset]) -> None:
    """The standard title always (viewers need it); the disclaimer in the Disclaimer item,
    the Series Description and each algorithm name, once each."""
    sr = _build(sources, fx.simulated_result(sources))
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    assert sr.SeriesDescription == SERIES_DESCRIPTION_SIMULATED
    (disclaimer,) = _named(sr, codes.DISCLAIMER)
    assert "simulated" in disclaimer.TextValue and "NOT FOR CLINICAL USE" in disclaimer.TextValue
    names = [i.TextValue for i in _walk(sr)
             if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert set(names) == {"sononode-sim" + codes.SIMULATED_SUFFIX}
    assert all(n.count("NOT FOR CLINICAL USE") == 1 for n in names)


def test_no_disclaimer_without_simulated_models(sources: list[Dataset]) -> None:
    sr = _build(sources, fx.normal_result(sources))
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    assert not _named(sr, codes.DISCLAIMER)


def test_superseding_sr_references_predecessor_in_same_series(sources: list[Dataset]) -> None:
    series = generate_uid()
    first = _build(sources, fx.review_result(sources), series_instance_uid=series)
    second = _build(sources, fx.normal_result(sources), series_instance_uid=series,
                    instance_number=2, previous_versions=[first])
    (study,) = second.PredecessorDocumentsSequence
    (ref_series,) = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series == second.SeriesInstanceUID
    assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first


def test_missing_type2_patient_attributes_do_not_block(sources: list[Dataset]) -> None:
    for s in sources:
        del s.StudyID
        del s.ReferringPhysicianName
    sr = _build(sources, fx.normal_result(sources))
    assert sr.StudyID == ""
    assert "StudyID" not in sources[0]  # inputs are not mutated


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_empty_sources(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="sources is empty"):
        _build([], fx.normal_result(sources))


def test_result_references_unknown_instance(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    with pytest.raises(ValueError, match=rf"references instance {result.images[2].sop_instance_uid}"
                                          r", which is not among the 2 source"):
        _build(sources[:2], result)


def test_source_from_another_study(sources: list[Dataset]) -> None:
    other = fx.make_source(generate_uid(), generate_uid(), number=9)
    with pytest.raises(ValueError, match=r"sources\[3\] .* belongs to study"):
        _build([*sources, other], fx.normal_result(sources))


def test_duplicate_source(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match=r"sources\[3\] repeats SOP Instance UID"):
        _build([*sources, sources[0]], fx.normal_result(sources))


def test_source_missing_uid(sources: list[Dataset]) -> None:
    del sources[1].SeriesInstanceUID
    with pytest.raises(ValueError, match=r"sources\[1\] lacks required attribute\(s\) "
                                         r"\['SeriesInstanceUID'\]"):
        _build(sources, fx.normal_result(sources))


def test_no_image_results(sources: list[Dataset]) -> None:
    result = dataclasses.replace(fx.normal_result(sources), images=())
    with pytest.raises(ValueError, match="has no image results"):
        _build(sources, result)


def test_duplicate_image_result(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    result = dataclasses.replace(result, images=(*result.images, result.images[0]))
    with pytest.raises(ValueError, match="more than one image result"):
        _build(sources, result)


def test_sop_class_mismatch(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[2], sop_class_uid=fx.US_IMAGE)
    result = dataclasses.replace(result, images=(*result.images[:2], bad))
    with pytest.raises(ValueError, match=re.escape(f"has SOP Class UID {fx.US_IMAGE}, but")):
        _build(sources, result)


@pytest.mark.parametrize(
    ("region", "message"),
    [((10, 10, 5, 20), "must satisfy 0 <= column0 < column1"),
     ((0, 0, 700, 100), "exceeds the 640x480 image")],
)
def test_bad_region(
    sources: list[Dataset], region: tuple[int, int, int, int], message: str
) -> None:
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[0], region=region)
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match=message):
        _build(sources, result)


def test_bad_frame_counts(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[2], frames_used=41)
    result = dataclasses.replace(result, images=(*result.images[:2], bad))
    with pytest.raises(ValueError, match="frames_used=41 and frames_total=40"):
        _build(sources, result)


def test_abstention_without_reason(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[0], finding=fx.finding(abstained=True))
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match="abstained 'finding' classification needs a reason"):
        _build(sources, result)


def test_code_meaning_too_long(sources: list[Dataset]) -> None:
    result = fx.normal_result(sources)
    long_code = CodedLabel("X1", "99SONONODE", "x" * 65)
    bad = dataclasses.replace(result.images[0], view=fx.view(long_code))
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match="exceeds DICOM limits"):
        _build(sources, result)


def test_series_uid_must_be_new(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="is a source series"):
        _build(sources, fx.normal_result(sources),
               series_instance_uid=sources[0].SeriesInstanceUID)


def test_invalid_uid(sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid is not a valid UID"):
        _build(sources, fx.normal_result(sources), sop_instance_uid="1.2.abc")


def test_previous_version_from_other_study(sources: list[Dataset]) -> None:
    other = fx.make_sources()
    previous = _build(other, fx.normal_result(other))
    with pytest.raises(ValueError, match=r"previous_versions\[0\] .* belongs to study"):
        _build(sources, fx.normal_result(sources), previous_versions=[previous])


def test_empty_previous_versions_writes_no_predecessors(sources: list[Dataset]) -> None:
    sr = _build(sources, fx.normal_result(sources), previous_versions=[])
    assert "PredecessorDocumentsSequence" not in sr


def test_an_out_of_distribution_loop_reports_no_class(sources: list[Dataset]) -> None:
    sr = _build(sources, fx.review_result(sources))
    assert len(_groups(sr)) == 2
    (item,) = _named(sr, codes.NOT_ANALYSED)
    assert item.ConceptCodeSequence[0].CodeValue == codes.NOT_ANALYSED_OOD.value
    values = {i.ConceptCodeSequence[0].CodeValue for i in _walk(item) if i.ValueType == "CODE"}
    assert fx.ABDOMEN.value not in values
    (score,) = [c for c in item.ContentSequence if c.ValueType == "NUM"]
    assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.97)


def test_the_model_packs_are_contributing_equipment_with_a_device_uid(
    sources: list[Dataset],
) -> None:
    """IHE AIR: each model pack as Processing Equipment, its Device UID from its sha256."""
    from dicom_sr.builder import device_uid

    sr = _build(sources, fx.normal_result(sources), device_observer_uid="1.2.3.4.5")
    equipment = {e.ManufacturerModelName: e for e in sr.ContributingEquipmentSequence
                 if "DeviceUID" in e}  # highdicom adds itself, without one
    assert set(equipment) == {"sononode-view", "sononode-finding"}
    view = equipment["sononode-view"]
    (purpose,) = view.PurposeOfReferenceCodeSequence  # IHE AIR's "Processing Algorithm"
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    assert view.SoftwareVersions == "1.2.0"
    assert view.DeviceUID == device_uid(fx.VIEW_ALGO) != device_uid(fx.FINDING_ALGO)
    observers = [i.UID for i in _walk(sr) if i.ValueType == "UIDREF"
                 and i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert observers == ["1.2.3.4.5"]


def test_a_superseding_sr_says_so_in_words(sources: list[Dataset]) -> None:
    series = generate_uid()
    first = _build(sources, fx.review_result(sources), series_instance_uid=series)
    second = _build(sources, fx.normal_result(sources), series_instance_uid=series,
                    instance_number=2, previous_versions=[first])
    (supersedes,) = _named(second, codes.SUPERSEDES)
    assert supersedes.TextValue == first.SOPInstanceUID
    (summary,) = _named(second, codes.SUMMARY)
    assert f"supersedes the earlier AI report(s) {first.SOPInstanceUID}" in summary.TextValue

def test_every_concept_is_in_the_docs_table() -> None:
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "SR.md").read_text()
    for name, value in vars(codes).items():
        if name.isupper() and isinstance(value, CodedConcept):
            assert f"| `{name}` | `{value.value}` | {value.scheme_designator} | " \
                   f"{value.meaning} |" in table, name


def test_warm_up_builds_a_report_without_a_patient() -> None:
    """The worker's warm-up goes through the whole builder and writer (it must not raise on
    a header that has no patient module)."""
    from dicom_sr.builder import warm_up

    warm_up()
