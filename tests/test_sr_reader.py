"""read_sr: build -> write -> read round-trips the StudyResult."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sr_fixtures as fx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr import AlgorithmIdentity, LabelSummary, SRSummary, build_sr, read_sr
from dicom_sr.builder import in_words, is_analysed
from dicom_sr.model import AlgorithmInfo, Classification, QCOutcome, StudyResult

CASES = {
    "normal": fx.normal_result,
    "review": fx.review_result,
    "qc_failed": fx.qc_failed_result,
    "not_assessable": fx.not_assessable_result,
    "simulated": fx.simulated_result,
}


def _round_trip(tmp_path: Path, sources: list[Dataset], result: StudyResult,
                **kw: Any) -> tuple[Dataset, SRSummary]:
    kw.setdefault("series_instance_uid", generate_uid())
    kw.setdefault("sop_instance_uid", generate_uid())
    sr = build_sr(sources, result, **kw)
    path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return sr, read_sr(dcmread(path))


def _assert_algorithm(found: AlgorithmIdentity | None, expected: AlgorithmInfo) -> None:
    assert found is not None
    assert (found.name, found.version, found.sha256, found.simulated_training_data) == (
        expected.name, expected.version, expected.sha256, expected.simulated_training_data)


def _assert_label(found: LabelSummary | None, expected: Classification | None,
                  reasons: tuple[str, ...] = ()) -> None:
    """The label as written: a best guess below its threshold keeps its code and
    probability, marked not confident, with the image's first review reason."""
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert found.abstained == expected.abstained
    assert found.code == expected.code
    assert found.label == expected.code.meaning
    assert found.probability == pytest.approx(round(expected.probability, 3), abs=1e-6)
    if expected.abstained:
        assert found.reason == (reasons[0] if reasons else found.reason)
    if expected.threshold is not None:
        assert found.threshold == pytest.approx(expected.threshold, abs=1e-6)
    _assert_algorithm(found.algorithm, expected.algorithm)


def assert_matches(summary: SRSummary, result: StudyResult,
                   source_size: tuple[int, int] = (640, 480)) -> None:
    assert summary.study_instance_uid == result.study_instance_uid
    assert set(summary.images) == {i.sop_instance_uid for i in result.images}
    for expected in result.images:
        image = summary.images[expected.sop_instance_uid]
        reasons = tuple(dict.fromkeys(in_words(r) for r in expected.review_reasons))
        assert image.sop_class_uid == expected.sop_class_uid
        assert image.qc_outcome == expected.qc_outcome
        assert image.needs_review == (expected.needs_review or not is_analysed(expected))
        if not is_analysed(expected):
            # A study-level "not analysed" statement: its reasons, no class.
            assert image.view is None and image.finding is None and image.region is None
            assert image.out_of_distribution == expected.out_of_distribution
            assert image.ood_score == pytest.approx(expected.ood_score)
            assert image.review_reasons == reasons
        assert [(r.outcome, r.message) for r in image.qc_reasons] == [
            (c.outcome, in_words(c.message)) for c in expected.qc_checks
            if c.outcome is not QCOutcome.PASS
        ]
        if not is_analysed(expected):
            continue
        assert image.quality_score == pytest.approx(
            None if expected.quality_score is None else round(expected.quality_score, 2))
        assert image.ood_score == pytest.approx(
            None if expected.ood_score is None else round(expected.ood_score, 2))
        assert (image.frames_total, image.frames_used) == (
            expected.frames_total, expected.frames_used)
        assert image.region == (expected.region or (0, 0, *source_size))
        assert image.review_reasons == reasons
        _assert_label(image.view, expected.view, reasons)
        _assert_label(image.finding, expected.finding if result.assessable else None, reasons)
    assert summary.needs_review == result.needs_review
    assert summary.review_reasons == tuple(dict.fromkeys(in_words(r)
                                                         for r in result.review_reasons))
    assert summary.assessable == result.assessable
    conclusion = result.conclusion if result.assessable else None
    _assert_label(summary.conclusion, conclusion,
                  (in_words(conclusion.reason or ""),) if conclusion else ())
    assert len(summary.algorithms) == len(result.algorithms)
    for found, expected_algorithm in zip(summary.algorithms, result.algorithms, strict=True):
        _assert_algorithm(found, expected_algorithm)
    assert summary.simulated_training_data == any(
        a.simulated_training_data for a in result.algorithms)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(tmp_path: Path, case: str) -> None:
    sources = fx.make_sources()
    result = CASES[case](sources)
    sr, summary = _round_trip(tmp_path, sources, result)
    assert_matches(summary, result)
    assert summary.sop_instance_uid == sr.SOPInstanceUID
    assert summary.series_instance_uid == sr.SeriesInstanceUID
    assert set(summary.evidence) == {s.SOPInstanceUID for s in sources}
    assert summary.predecessors == ()


def test_round_trip_of_the_in_memory_dataset() -> None:
    sources = fx.make_sources()
    result = fx.review_result(sources)
    sr = build_sr(sources, result, series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())
    assert_matches(read_sr(sr), result)


def test_not_assessable_reasons_and_disclaimer(tmp_path: Path) -> None:
    sources = fx.make_sources()
    _, summary = _round_trip(tmp_path, sources, fx.not_assessable_result(sources))
    assert summary.not_assessable_reasons == (
        "No usable image: all frames are blank", "All frames are blank")
    assert summary.disclaimer is None
    _, simulated = _round_trip(tmp_path, sources, fx.simulated_result(sources))
    assert simulated.disclaimer is not None and "NOT FOR CLINICAL USE" in simulated.disclaimer
    assert simulated.title == "Imaging Measurement Report"


def test_predecessors(tmp_path: Path) -> None:
    sources = fx.make_sources()
    series = generate_uid()
    first, _ = _round_trip(tmp_path, sources, fx.review_result(sources),
                           series_instance_uid=series)
    _, summary = _round_trip(tmp_path, sources, fx.normal_result(sources),
                             series_instance_uid=series, instance_number=2,
                             previous_versions=[first])
    assert summary.predecessors == (first.SOPInstanceUID,)
    assert summary.series_instance_uid == series


def test_rejects_a_non_sr_dataset() -> None:
    source = fx.make_sources()[0]
    with pytest.raises(ValueError, match="not an SR document"):
        read_sr(source)


def test_rejects_an_sr_without_tid_1500() -> None:
    sources = fx.make_sources()
    sr = build_sr(sources, fx.normal_result(sources), series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())
    sr.ContentTemplateSequence[0].TemplateIdentifier = "2000"
    with pytest.raises(ValueError, match="not a TID 1500 Measurement Report"):
        read_sr(sr)
