"""Study analysis: frame sampling, aggregation, abstention, review flags, conclusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dicom_sr.model import QCCheck, QCOutcome, StudyResult
from modelkit.testing import prepared_instance, stub_pack, tiny_manifest, write_tiny_pack
from workers.imaging.pixels import sample_frames
from workers.models.inference import Analyser
from workers.models.packs import ModelPack

THYROID = [0.0, 5.0, 0.0, 0.0, 0.0]  # confident thyroid_transverse
LUNG = [0.0, 0.0, 0.0, 0.0, 5.0]
FLAT = [0.0, 0.0, 0.0, 0.0, 0.0]  # p = 0.2 each


def test_sample_frames_spreads_evenly() -> None:
    assert sample_frames(list(range(120)), 16)[0] == 0
    assert sample_frames(list(range(120)), 16)[-1] == 119
    assert len(sample_frames(list(range(120)), 16)) == 16
    assert sample_frames([3, 5], 16) == [3, 5]


def test_confident_view_and_finding() -> None:
    pack = stub_pack({"view": THYROID, "nodule": [0.0, 4.0, 0.0]})
    result = Analyser([pack]).analyse_study("1.2.3", [prepared_instance()])
    image = result.images[0]
    assert image.view is not None and image.view.label == "thyroid_transverse"
    assert not image.view.abstained and image.view.probability > 0.9
    assert image.finding is not None and image.finding.task == "nodule"
    assert image.finding.label == "benign" and not image.finding.abstained
    assert image.quality_score == pytest.approx(0.7)
    assert image.region == (10, 10, 150, 110)
    assert not image.needs_review
    assert result.conclusion == image.finding
    assert not result.needs_review
    assert result.algorithms[0].simulated_training_data
    # The result round-trips through the index's JSON.
    assert StudyResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_abstains_on_low_confidence() -> None:
    pack = stub_pack({"view": FLAT})
    result = Analyser([pack]).analyse_study("1.2.3", [prepared_instance()])
    image = result.images[0]
    assert image.view is not None and image.view.abstained
    assert "View not confident: 20.0% is below the 60.0% threshold" in (image.view.reason or "")
    assert image.finding is None
    assert image.needs_review and result.needs_review
    assert "low confidence: 1" in result.review_reasons[0]


def test_review_confidence_raises_the_floor() -> None:
    pack = stub_pack({"view": [0.0, 2.0, 0.0, 0.0, 0.0], "nodule": [5.0, 0.0, 0.0]})  # p ~ 0.65
    assert not Analyser([pack]).analyse_study("s", [prepared_instance()]).needs_review
    strict = Analyser([pack], review_confidence=0.9).analyse_study("s", [prepared_instance()])
    assert strict.images[0].view is not None and strict.images[0].view.abstained
    assert "below the 90.0% threshold" in (strict.images[0].view.reason or "")


def test_abstains_on_abstain_label() -> None:
    manifest = tiny_manifest()
    manifest["tasks"]["view"]["abstain_labels"] = ["abdomen"]
    pack = stub_pack({"view": [6.0, 0.0, 0.0, 0.0, 0.0]}, manifest=manifest)
    image = Analyser([pack]).analyse_study("s", [prepared_instance()]).images[0]
    assert image.view is not None and image.view.label == "abdomen" and image.view.abstained
    assert "'abdomen' is not a reportable result" in (image.view.reason or "")
    assert image.needs_review


def test_operating_point_reports_malignant_below_argmax() -> None:
    # p(malignant) ~ 0.42 >= operating point 0.4 while 'benign' has the highest probability.
    pack = stub_pack({"view": THYROID, "nodule": [-3.0, 0.35, 0.0]})
    result = Analyser([pack]).analyse_study("s", [prepared_instance()])
    finding = result.images[0].finding
    assert finding is not None and finding.label == "malignant" and not finding.abstained
    assert finding.threshold == pytest.approx(0.4)
    assert result.conclusion is not None and result.conclusion.label == "malignant"


def test_out_of_distribution_input_abstains() -> None:
    pack = stub_pack({"view": THYROID}, ood_threshold=1.0, ood_center=-5.0)
    image = Analyser([pack]).analyse_study("s", [prepared_instance()]).images[0]
    assert image.out_of_distribution and image.ood_score is not None and image.ood_score > 1.0
    assert image.view is not None and image.view.abstained
    assert "out of distribution" in (image.view.reason or "")
    assert image.needs_review


def test_failed_qc_is_not_analysed_and_needs_review() -> None:
    pack = stub_pack({"view": THYROID, "nodule": [5.0, 0.0, 0.0]})
    failed = prepared_instance(outcome=QCOutcome.FAIL, uid="1.2.9")
    ok = prepared_instance(uid="1.2.10")
    result = Analyser([pack]).analyse_study("s", [failed, ok])
    bad, good = result.images
    assert bad.view is None and bad.frames_used == 0 and bad.needs_review
    assert bad.review_reasons == ("QC failed",)
    assert good.view is not None and not good.needs_review
    assert result.needs_review and "QC: 1" in result.review_reasons[0]


def test_study_not_assessable_abstains_conclusion() -> None:
    pack = stub_pack({"view": LUNG, "lung_pattern": [0.0, 0.0, 5.0]})
    check = QCCheck("too_few_images", QCOutcome.FAIL, "only one image")
    result = Analyser([pack]).analyse_study(
        "s", [prepared_instance()], assessable=False, study_checks=(check,)
    )
    assert result.conclusion is not None and result.conclusion.abstained
    assert result.conclusion.label == "consolidation"
    assert result.needs_review and "study not assessable: only one image" in result.review_reasons


def test_conclusion_is_the_most_severe_finding() -> None:
    # Grey level selects the view: dark frames -> lung with B-lines, bright -> thyroid, malignant.
    def view(mean):  # type: ignore[no-untyped-def]
        bright = (mean > 0.0).float()[:, None]
        return bright * torch.tensor(THYROID) + (1 - bright) * torch.tensor(LUNG)

    pack = stub_pack({"view": view, "nodule": [0.0, 0.0, 5.0], "lung_pattern": [0.0, 5.0, 0.0]})
    lung = prepared_instance(grey=10, uid="1.1")
    thyroid = prepared_instance(grey=240, uid="1.2")
    result = Analyser([pack]).analyse_study("s", [lung, thyroid])
    assert result.images[0].finding is not None
    assert result.images[0].finding.label == "b_lines"
    assert result.conclusion is not None and result.conclusion.label == "malignant"


def test_cine_loop_of_120_frames_is_sampled_on_cpu(tmp_path: Path) -> None:
    pack = ModelPack.load(write_tiny_pack(tmp_path / "tiny"), device="cpu")
    loop = prepared_instance(frames=120, size=(240, 320), scan_region=(20, 30, 300, 230))
    still = prepared_instance(frames=1, uid="1.2.99")
    analyser = Analyser([pack], batch_size=8, max_frames=16)
    result = analyser.analyse_study("1.2.3", [loop, still])
    image = result.images[0]
    assert image.frames_total == 120 and image.frames_used == 16
    assert result.images[1].frames_used == 1
    assert image.view is not None and 0.0 <= image.view.probability <= 1.0
    assert image.ood_score is not None and image.quality_score is not None


def test_analyser_validates_arguments() -> None:
    with pytest.raises(ValueError, match="at least one model pack"):
        Analyser([])
    pack = stub_pack({"view": THYROID})
    with pytest.raises(ValueError, match="batch_size"):
        Analyser([pack], batch_size=0)
