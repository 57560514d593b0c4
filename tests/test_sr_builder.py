"""build_sr: document header, content tree, provenance, disclaimers and input validation."""

from __future__ import annotations

import dataclasses
import re

import pytest
import sr_fixtures as fx
from highdicom.sr import Comprehensive3DSR
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr import build_sr, codes
from dicom_sr.builder import SERIES_DESCRIPTION_SIMULATED


def _build(sources: list[Dataset], result, **kw) -> Dataset:
    kw.setdefault("series_instance_uid", generate_uid())
    kw.setdefault("sop_instance_uid", generate_uid())
    return build_sr(sources, result, **kw)


def _walk(item: Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _named(ds: Dataset, concept) -> list[Dataset]:
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


def test_header_copies_patient_and_study_and_uses_new_series(sources):
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


def test_evidence_references_every_source(sources):
    sr = _build(sources, fx.normal_result(sources))
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    referenced = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
        for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence
    }
    assert referenced == {(s.SOPClassUID, s.SOPInstanceUID) for s in sources}


def test_evidence_includes_sources_without_an_image_result(sources):
    result = fx.normal_result(sources)
    result = dataclasses.replace(result, images=result.images[:1])
    sr = _build(sources, result)
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert sum(len(s.ReferencedSOPSequence) for s in study.ReferencedSeriesSequence) == 3
    assert len(_groups(sr)) == 1


def test_one_group_per_image_with_tracking_and_source_reference(sources):
    sr = _build(sources, fx.normal_result(sources))
    groups = _groups(sr)
    assert len(groups) == 3
    for group, source in zip(groups, sources, strict=True):
        names = [c.ConceptNameCodeSequence[0].CodeValue for c in group.ContentSequence]
        assert "112039" in names and "112040" in names  # tracking id and uid
        refs = [
            r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for r in _walk(group) if r.ValueType == "IMAGE"
        ]
        assert refs == [source.SOPInstanceUID]
    # the first image has a region: TID 1410 with a closed polygon on the source image
    (region,) = [c for c in groups[0].ContentSequence if c.ValueType == "SCOORD"]
    assert region.GraphicType == "POLYLINE"
    assert [float(v) for v in region.GraphicData] == [40, 30, 600, 30, 600, 450, 40, 450, 40, 30]
    assert groups[0].ContentTemplateSequence[0].TemplateIdentifier == "1410"
    assert groups[1].ContentTemplateSequence[0].TemplateIdentifier == "1501"


def test_tracking_uid_is_stable_across_versions(sources):
    result = fx.normal_result(sources)
    uids = [
        [i.UID for i in _named(_build(sources, result), codes.CodedConcept(
            "112040", "DCM", "Tracking Unique Identifier"))]
        for _ in range(2)
    ]
    assert uids[0] == uids[1] and len(set(uids[0])) == 3


def test_every_model_output_carries_algorithm_identification(sources):
    sr = _build(sources, fx.normal_result(sources))
    model_items = (
        _named(sr, codes.IMAGE_VIEW) + _named(sr, codes.FINDING) + _named(sr, codes.CONCLUSION)
    )
    assert len(model_items) == 3 + 3 + 1
    for item in model_items:
        children = {c.ConceptNameCodeSequence[0].CodeValue: c for c in item.ContentSequence}
        assert {"111001", "111003", "111002"} <= set(children)
        assert children["111002"].TextValue.startswith("sha256=")
        assert children["111002"].TextValue[7:] in {"a" * 64, "b" * 64}
        assert children["111001"].RelationshipType == "HAS CONCEPT MOD"


def test_probability_is_written_in_percent(sources):
    sr = _build(sources, fx.normal_result(sources))
    view = _named(sr, codes.IMAGE_VIEW)[0]
    (prob,) = [c for c in view.ContentSequence if c.ValueType == "NUM"
               and c.ConceptNameCodeSequence[0].CodeValue == codes.PROBABILITY.value]
    value = prob.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(93.0)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"


def test_abstained_finding_is_not_presented(sources):
    result = fx.review_result(sources)
    sr = _build(sources, result)
    abstained_image = _groups(sr)[1]
    (finding,) = _named(abstained_image, codes.FINDING)
    assert finding.ConceptCodeSequence[0].CodeValue == codes.REQUIRES_HUMAN_REVIEW.value
    # neither the withheld code nor its probability appears anywhere in the group
    values = {i.ConceptCodeSequence[0].CodeValue for i in _walk(abstained_image)
              if i.ValueType == "CODE"}
    assert fx.ABNORMAL.value not in values
    assert not [c for c in finding.ContentSequence
                if c.ConceptNameCodeSequence[0].CodeValue == codes.PROBABILITY.value]
    reasons = [c.TextValue for c in finding.ContentSequence if c.ValueType == "TEXT"
               and c.ConceptNameCodeSequence[0].CodeValue == codes.REVIEW_REASON.value]
    assert reasons == ["low confidence: 0.41 below threshold 0.70"]


def test_study_review_statement_is_coded_and_textual(sources):
    sr = _build(sources, fx.review_result(sources))
    study_reviews = [i for i in _named(sr, codes.HUMAN_REVIEW)
                     if "image 2" in i.ContentSequence[0].TextValue]
    assert len(study_reviews) == 1
    assert study_reviews[0].ConceptCodeSequence[0].CodeMeaning == "Requires human review"
    (summary,) = _named(sr, codes.SUMMARY)
    assert summary.TextValue.startswith("REQUIRES HUMAN REVIEW: image 2: low confidence")
    (conclusion,) = _named(sr, codes.CONCLUSION)
    assert conclusion.ConceptCodeSequence[0].CodeValue == codes.REQUIRES_HUMAN_REVIEW.value


def test_qc_failed_image_lists_non_pass_reasons(sources):
    sr = _build(sources, fx.qc_failed_result(sources))
    quality = _named(_groups(sr)[0], codes.IMAGE_QUALITY)[0]
    assert quality.ConceptCodeSequence[0].CodeValue == "111235"  # unusable
    reasons = [c.TextValue for c in quality.ContentSequence if c.ValueType == "TEXT"]
    assert reasons == ["saturated: 62% of pixels saturated", "low_contrast: contrast below 0.1"]
    assert not _named(_groups(sr)[0], codes.IMAGE_VIEW)


def test_not_assessable_study_presents_no_finding(sources):
    result = fx.not_assessable_result(sources)
    # even a stray finding from a worker must not be presented
    images = (dataclasses.replace(result.images[0], finding=fx.finding()), *result.images[1:])
    result = dataclasses.replace(result, images=images, conclusion=fx.finding())
    sr = _build(sources, result)
    assert not _named(sr, codes.FINDING)
    assert not _named(sr, codes.CONCLUSION)
    (assess,) = _named(sr, codes.ASSESSABILITY)
    assert assess.ConceptCodeSequence[0].CodeValue == codes.NOT_ASSESSABLE.value
    reasons = [c.TextValue for c in assess.ContentSequence]
    assert "blank: all frames are blank" in reasons
    (summary,) = _named(sr, codes.SUMMARY)
    assert "NOT ASSESSABLE" in summary.TextValue


def test_simulated_training_data_disclaimer(sources):
    sr = _build(sources, fx.simulated_result(sources))
    assert "NOT FOR CLINICAL USE" in sr.ConceptNameCodeSequence[0].CodeMeaning
    assert sr.SeriesDescription == SERIES_DESCRIPTION_SIMULATED
    (disclaimer,) = _named(sr, codes.DISCLAIMER)
    assert "simulated" in disclaimer.TextValue and "NOT FOR CLINICAL USE" in disclaimer.TextValue
    names = {i.TextValue for i in _walk(sr)
             if i.ConceptNameCodeSequence[0].CodeValue == "111001"}
    assert names == {"sononode-sim" + codes.SIMULATED_SUFFIX}


def test_no_disclaimer_without_simulated_models(sources):
    sr = _build(sources, fx.normal_result(sources))
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    assert not _named(sr, codes.DISCLAIMER)


def test_superseding_sr_references_predecessor_in_same_series(sources):
    series = generate_uid()
    first = _build(sources, fx.review_result(sources), series_instance_uid=series)
    second = _build(sources, fx.normal_result(sources), series_instance_uid=series,
                    instance_number=2, previous_versions=[first])
    (study,) = second.PredecessorDocumentsSequence
    (ref_series,) = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series == second.SeriesInstanceUID
    assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first


def test_missing_type2_patient_attributes_do_not_block(sources):
    for s in sources:
        del s.StudyID
        del s.ReferringPhysicianName
    sr = _build(sources, fx.normal_result(sources))
    assert sr.StudyID == ""
    assert "StudyID" not in sources[0]  # inputs are not mutated


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_empty_sources(sources):
    with pytest.raises(ValueError, match="sources is empty"):
        _build([], fx.normal_result(sources))


def test_result_references_unknown_instance(sources):
    result = fx.normal_result(sources)
    with pytest.raises(ValueError, match=rf"references instance {result.images[2].sop_instance_uid}"
                                          r", which is not among the 2 source"):
        _build(sources[:2], result)


def test_source_from_another_study(sources):
    other = fx.make_source(generate_uid(), generate_uid(), number=9)
    with pytest.raises(ValueError, match=r"sources\[3\] .* belongs to study"):
        _build([*sources, other], fx.normal_result(sources))


def test_duplicate_source(sources):
    with pytest.raises(ValueError, match=r"sources\[3\] repeats SOP Instance UID"):
        _build([*sources, sources[0]], fx.normal_result(sources))


def test_source_missing_uid(sources):
    del sources[1].SeriesInstanceUID
    with pytest.raises(ValueError, match=r"sources\[1\] lacks required attribute\(s\) "
                                         r"\['SeriesInstanceUID'\]"):
        _build(sources, fx.normal_result(sources))


def test_no_image_results(sources):
    result = dataclasses.replace(fx.normal_result(sources), images=())
    with pytest.raises(ValueError, match="has no image results"):
        _build(sources, result)


def test_duplicate_image_result(sources):
    result = fx.normal_result(sources)
    result = dataclasses.replace(result, images=(*result.images, result.images[0]))
    with pytest.raises(ValueError, match="more than one image result"):
        _build(sources, result)


def test_sop_class_mismatch(sources):
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
def test_bad_region(sources, region, message):
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[0], region=region)
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match=message):
        _build(sources, result)


def test_bad_frame_counts(sources):
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[2], frames_used=41)
    result = dataclasses.replace(result, images=(*result.images[:2], bad))
    with pytest.raises(ValueError, match="frames_used=41 and frames_total=40"):
        _build(sources, result)


def test_abstention_without_reason(sources):
    result = fx.normal_result(sources)
    bad = dataclasses.replace(result.images[0], finding=fx.finding(abstained=True))
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match="abstained 'finding' classification needs a reason"):
        _build(sources, result)


def test_code_meaning_too_long(sources):
    result = fx.normal_result(sources)
    long_code = fx.CodedLabel("X1", "99SONONODE", "x" * 65)
    bad = dataclasses.replace(result.images[0], view=fx.view(long_code))
    result = dataclasses.replace(result, images=(bad, *result.images[1:]))
    with pytest.raises(ValueError, match="exceeds DICOM limits"):
        _build(sources, result)


def test_series_uid_must_be_new(sources):
    with pytest.raises(ValueError, match="is a source series"):
        _build(sources, fx.normal_result(sources),
               series_instance_uid=sources[0].SeriesInstanceUID)


def test_invalid_uid(sources):
    with pytest.raises(ValueError, match="sop_instance_uid is not a valid UID"):
        _build(sources, fx.normal_result(sources), sop_instance_uid="1.2.abc")


def test_previous_version_from_other_study(sources):
    other = fx.make_sources()
    previous = _build(other, fx.normal_result(other))
    with pytest.raises(ValueError, match=r"previous_versions\[0\] .* belongs to study"):
        _build(sources, fx.normal_result(sources), previous_versions=[previous])


def test_empty_previous_versions_writes_no_predecessors(sources):
    sr = _build(sources, fx.normal_result(sources), previous_versions=[])
    assert "PredecessorDocumentsSequence" not in sr


def test_out_of_distribution_loop_withholds_its_view(sources):
    sr = _build(sources, fx.review_result(sources))
    loop = _groups(sr)[2]
    (view,) = _named(loop, codes.IMAGE_VIEW)
    assert view.ConceptCodeSequence[0].CodeValue == codes.REQUIRES_HUMAN_REVIEW.value
    (ood,) = _named(loop, codes.OUT_OF_DISTRIBUTION)
    assert ood.ConceptCodeSequence[0].CodeValue == codes.YES.value
    score = ood.ContentSequence[0].MeasuredValueSequence[0].NumericValue
    assert float(score) == pytest.approx(0.97)
