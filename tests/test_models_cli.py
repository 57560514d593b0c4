"""``sononode model`` commands on tiny packs and small simulated data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelkit.cli import main
from modelkit.testing import write_tiny_pack
from workers.models.packs import ModelPack

needs_simulator = pytest.mark.skipif(
    importlib.util.find_spec("simulator") is None, reason="simulator missing"
)


def test_info_verifies_a_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_tiny_pack(tmp_path / "tiny")
    assert main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["simulated_training_data"]
    assert info["tasks"]["nodule"]["applies_to"] == ["thyroid_transverse", "thyroid_longitudinal"]


def test_info_reads_a_pack_without_torch() -> None:
    """``sononode model info`` answers from the manifest: no network is built, torch stays out."""
    bundled = Path(__file__).resolve().parents[1] / "deploy" / "models" / "sononode-us-sim"
    code = ("import sys; from node.cli import main; "
            f"code = main(['model', 'info', {str(bundled)!r}]); "
            "assert code == 0 and 'torch' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verified"] is True


def test_info_refuses_a_tampered_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_tiny_pack(tmp_path / "tiny")
    (folder / "weights.pt").write_bytes(b"garbage")
    assert main(["info", str(folder)]) == 2
    assert "sha256" in capsys.readouterr().err


@needs_simulator
@pytest.mark.slow
def test_train_evaluate_threshold_distill_on_simulated_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher"
    train = ["train", "--simulated", "40", "--epochs", "2", "--width", "0.5", "--seed", "3"]
    assert main([*train, "--out", str(teacher)]) == 0
    teacher_pack = ModelPack.load(teacher, device="cpu")
    assert teacher_pack.manifest.simulated
    assert teacher_pack.manifest.architecture_params == {
        "width": 0.5,
        "pool": "avgmax",
        "output_stride": 16,
    }
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
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert evaluation["overall"]["view"]["confusion_matrix"]
    assert set(evaluation["per_vendor"]) >= {"Solace Systems"}
    for metrics in (evaluation["overall"], *evaluation["per_vendor"].values()):
        view = metrics["view"]
        assert 0 < view["ece_noise95"] < 1 and 0 <= view["aurc"] <= 1
    # A vendor's few frames: its ECE is shown beside what chance alone gives.
    assert "ECE noise" in (report / "evaluation.md").read_text()
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
    capsys.readouterr()

    # Distillation on real simulated frames: the student is smaller, and its size and
    # accuracy are reported next to the teacher's on the same held-out studies.
    student = tmp_path / "student"
    distill = ["distill", "--simulated", "40", "--seed", "6", "--epochs", "2"]
    assert (
        main([*distill, "--teacher", str(teacher), "--width", "0.25", "--out", str(student)]) == 0
    )
    table = capsys.readouterr().out
    assert "| teacher: " in table and "| student: " in table and "MB (float32)" in table
    comparison = ModelPack.load(student, device="cpu").manifest.raw["metrics"]["distillation"]
    s, t = comparison["student"], comparison["teacher"]
    assert 0 < s["size"]["parameters"] < t["size"]["parameters"]
    assert 0 < s["size"]["float32_megabytes"] < t["size"]["float32_megabytes"]
    assert comparison["size_ratio"] == pytest.approx(
        s["size"]["parameters"] / t["size"]["parameters"], abs=1e-4
    )
    for task in ("view", "nodule", "lung_pattern"):
        assert 0.0 <= s["metrics"][task]["accuracy"] <= 1.0
        assert 0.0 <= t["metrics"][task]["accuracy"] <= 1.0
        assert 0.0 <= comparison["agreement_with_teacher"][task] <= 1.0
    assert comparison["test_frames"] > 0

    # An ensemble of teachers: compared as one (its members averaged), twice the size
    # (fewer studies: only the comparison's bookkeeping is checked here).
    ensemble = tmp_path / "student-of-ensemble"
    assert (
        main(
            [
                "distill",
                "--simulated",
                "12",
                "--seed",
                "6",
                "--epochs",
                "1",
                "--teacher",
                str(teacher),
                "--teacher",
                str(teacher),
                "--width",
                "0.25",
                "--out",
                str(ensemble),
            ]
        )
        == 0
    )
    comparison = ModelPack.load(ensemble, device="cpu").manifest.raw["metrics"]["distillation"]
    assert comparison["teacher"]["name"].startswith("ensemble of")
    assert comparison["teacher"]["size"]["parameters"] == 2 * t["size"]["parameters"]


@needs_simulator
@pytest.mark.slow
def test_train_from_a_dicom_folder_written_by_sononode_simulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main as sononode

    data = tmp_path / "studies"
    simulate = ["simulate", "--out", str(data), "--studies", "8", "--images", "3"]
    assert sononode([*simulate, "--loops", "1", "--frames", "4", "--seed", "11"]) == 0
    assert len(list(data.rglob("labels.csv"))) == 8
    pack = tmp_path / "from-dicom"
    # No --labels: every study's labels.csv is read, file paths relative to it.
    args = ["model", "train", "--data", str(data), "--simulated-data", "--out", str(pack)]
    assert sononode([*args, "--epochs", "1", "--width", "0.25", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "pack written to" in out
    loaded = ModelPack.load(pack, device="cpu")
    # Flagged simulated; the SR builder adds the disclaimer to the algorithm name.
    assert loaded.manifest.simulated and loaded.algorithm.simulated_training_data
    assert str(data) in loaded.manifest.raw["training_data"]["description"]
    metrics = loaded.manifest.raw["metrics"]
    assert metrics["overall"]["frames"] > 0 and "view" in metrics["overall"]
    # One labels CSV, rows found by SOP Instance UID instead of file name.
    one = tmp_path / "one.csv"
    rows = (data / "study_001" / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, name in enumerate(header) if name != "file"]
    one.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in rows) + "\n")
    from modelkit.data import read_labelled_folder

    frames = read_labelled_folder(data, one, input_size=(64, 80))
    assert len(frames) >= 3 and frames.images.shape[1:] == (64, 80)
    assert len(set(frames.study.tolist())) == 1


def test_train_refuses_too_few_studies_to_split(tmp_path: Path) -> None:
    from modelkit.cli import _three_way_split
    from modelkit.data import FrameSet

    frames = FrameSet(
        images=torch.zeros(6, 8, 8, dtype=torch.uint8),
        labels={"view": torch.zeros(6, dtype=torch.int64)},
        quality=torch.zeros(6),
        vendor=["A"] * 6,
        study=torch.tensor([0, 0, 1, 1, 2, 2]),
    )
    with pytest.raises(SystemExit, match="at least 7 studies"):
        _three_way_split(frames, 0)


def test_an_acquisition_change_is_for_simulated_images_only(tmp_path: Path) -> None:
    folder = write_tiny_pack(tmp_path / "pack")
    with pytest.raises(SystemExit, match="use it with --simulated"):
        main(["evaluate", str(folder), "--data", str(tmp_path), "--acquisition", "gain+3",
              "--report-dir", str(tmp_path / "report")])
    with pytest.raises(SystemExit):  # argparse: not one of the changes
        main(["evaluate", str(folder), "--simulated", "2", "--acquisition", "gain+30",
              "--report-dir", str(tmp_path / "report")])
