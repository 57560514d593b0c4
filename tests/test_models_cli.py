"""``sononode model`` commands on tiny packs and small simulated data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from workers.models.cli import main
from workers.models.packs import ModelPack
from workers.models.testing import write_tiny_pack

needs_simulator = pytest.mark.skipif(
    importlib.util.find_spec("workers.simulator") is None, reason="workers.simulator missing"
)


def test_info_verifies_a_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_tiny_pack(tmp_path / "tiny")
    assert main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["simulated_training_data"]
    assert info["tasks"]["nodule"]["applies_to"] == ["thyroid_transverse", "thyroid_longitudinal"]


def test_info_refuses_a_tampered_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_tiny_pack(tmp_path / "tiny")
    (folder / "weights.pt").write_bytes(b"garbage")
    assert main(["info", str(folder)]) == 2
    assert "sha256" in capsys.readouterr().err


@needs_simulator
@pytest.mark.slow
def test_train_evaluate_threshold_distill_on_simulated_data(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    assert (
        main(
            [
                "train",
                "--simulated",
                "40",
                "--epochs",
                "1",
                "--width",
                "0.25",
                "--out",
                str(teacher),
                "--seed",
                "3",
            ]
        )
        == 0
    )
    ModelPack.load(teacher, device="cpu")
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                str(teacher),
                "--simulated",
                "15",
                "--seed",
                "4",
                "--report-dir",
                str(report),
            ]
        )
        == 0
    )
    assert (report / "evaluation.json").is_file() and (report / "evaluation.md").is_file()
    assert (report / "reliability_view.png").is_file()
    assert (report / "roc_nodule_malignant.png").is_file()
    assert (
        main(
            [
                "threshold",
                str(teacher),
                "--simulated",
                "30",
                "--seed",
                "5",
                "--target-sensitivity",
                "0.9",
            ]
        )
        == 0
    )
    op = ModelPack.load(teacher, device="cpu").tasks["nodule"].operating_point
    assert op is not None and op.method == "sensitivity>=0.9"
    student = tmp_path / "student"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--simulated",
                "40",
                "--epochs",
                "1",
                "--width",
                "0.25",
                "--out",
                str(student),
            ]
        )
        == 0
    )
    assert ModelPack.load(student, device="cpu").manifest.raw["metrics"]["distillation"]
