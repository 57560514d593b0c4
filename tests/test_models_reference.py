"""The committed reference pack: integrity, provenance, and accuracy on fresh simulated images."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_sr.codes import SIMULATED_SUFFIX
from dicom_sr.model import QCOutcome
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance
from workers.models.inference import Analyser
from workers.models.packs import ModelPack

PACK = Path(__file__).resolve().parent.parent / "deploy" / "models" / "sononode-us-sim"
#: Seed never used to build the pack (training 20250, calibration split of it, test 20252).
FRESH_SEED = 777
#: Fresh studies evaluated (all vendors, round robin: 40 per vendor, about 160 frames each).
FRESH_STUDIES = 200


def tolerance(claimed: list[float], fresh: list[float], *, floor: float = 0.02) -> float:
    """The stated tolerance between the manifest's figure and a fresh evaluation: 3 standard
    errors of their difference, each standard error read off its 95 % study-bootstrap
    interval (half-width / 1.96; the manifest's own test set is a sample too), and at least
    ``floor``."""
    se = [(high - low) / (2 * 1.96) for low, high in (claimed, fresh)]
    return max(floor, 3.0 * math.hypot(*se))


needs_simulator = pytest.mark.skipif(
    importlib.util.find_spec("simulator") is None, reason="simulator missing"
)


@pytest.fixture(scope="module")
def pack() -> ModelPack:
    if not (PACK / "manifest.json").is_file():
        pytest.skip("reference pack not built yet")
    return ModelPack.load(PACK, device="cpu")


def test_reference_pack_loads_and_is_flagged_simulated(pack: ModelPack) -> None:
    assert pack.manifest.simulated
    # The name is the pack's own; the SR builder adds the disclaimer to it, once.
    assert pack.algorithm.name == pack.manifest.name
    assert SIMULATED_SUFFIX.strip() not in pack.algorithm.name
    assert pack.manifest.ood is not None
    assert pack.tasks["nodule"].operating_point is not None
    size = sum(f.stat().st_size for f in PACK.iterdir() if f.is_file())
    assert size < 8_000_000
    for name in ("MODEL_CARD.md", "EVALUATION.md"):
        text = (PACK / name).read_text()
        assert "NOT FOR CLINICAL USE" in text and "simulated" in text, name
    training = pack.manifest.raw["training_data"]
    assert "not for clinical use" in training["description"]
    assert training["held_out_vendor"] not in training["vendors"]
    assert "frame_for_model" in training["preprocessing"]


@needs_simulator
@pytest.mark.slow
def test_reference_pack_reproduces_its_manifest_metrics_on_fresh_studies(
    pack: ModelPack,
) -> None:
    """Fresh simulated studies of every vendor (seed never used to build the pack) give the
    manifest's figures within :func:`tolerance`: overall (including sensitivity and
    specificity at the malignant operating point), per training vendor, and for the vendor
    held out of training, whose drop the manifest documents."""
    from modelkit.data import simulate_frameset, vendor_names
    from modelkit.evaluate import evaluate_pack
    from simulator import HELD_OUT_VENDOR, VENDOR_STYLES

    frames = simulate_frameset(
        FRESH_STUDIES,
        seed=FRESH_SEED,
        input_size=(pack.input.height, pack.input.width),
        vendors=vendor_names(VENDOR_STYLES),
        progress=False,
    )
    fresh = evaluate_pack(pack, frames, held_out_vendor=HELD_OUT_VENDOR, resamples=500)
    claimed = pack.manifest.raw["metrics"]
    misses = []

    def check(where: str, got: dict[str, Any], want: dict[str, Any], key: str) -> None:
        if want.get(key) is None or got.get(key) is None:
            return
        tol = tolerance(want["ci95"][key], got["ci95"][key])
        if abs(got[key] - want[key]) > tol:
            misses.append(
                f"{where} {key}: fresh {got[key]:.3f}, manifest {want[key]:.3f} +-{tol:.3f}"
            )

    keys = ("accuracy", "malignant_auc", "malignant_sensitivity", "malignant_specificity")
    for task in ("view", "nodule", "lung_pattern"):
        for key in keys:
            check(f"overall {task}", fresh["overall"][task], claimed["overall"][task], key)
    # Per vendor style (40 fresh studies each): the view accuracy and the nodule AUC.
    for vendor, want in claimed["per_vendor"].items():
        got = fresh["per_vendor"][vendor]
        check(vendor, got["view"], want["view"], "accuracy")
        check(vendor, got["nodule"], want["nodule"], "malignant_auc")
    assert not misses, misses
    # The held-out vendor style is a documented drop, not a surprise: in the manifest its view
    # accuracy is lower and more of its frames are flagged out of distribution than the
    # training vendors', and fresh studies show the same.
    held_out, seen = claimed["per_vendor"][HELD_OUT_VENDOR], claimed["seen_vendors"]
    assert held_out["held_out"] is True
    assert held_out["view"]["accuracy"] < seen["view"]["accuracy"]
    assert held_out["ood_flagged_fraction"] > seen["ood_flagged_fraction"]
    fresh_held_out = fresh["per_vendor"][HELD_OUT_VENDOR]
    assert fresh_held_out["ood_flagged_fraction"] > fresh["seen_vendors"]["ood_flagged_fraction"]
    # Far above chance (5 views: 0.2; benign vs malignant: AUC 0.5).
    assert fresh["seen_vendors"]["view"]["accuracy"] > 0.9
    assert fresh["seen_vendors"]["nodule"]["malignant_auc"] > 0.65


@needs_simulator
def test_reference_pack_analyses_a_simulated_cine_loop(pack: ModelPack) -> None:
    from simulator import TRAINING_VENDORS, simulate_loop

    rng = np.random.default_rng(FRESH_SEED)
    correct = 0
    for i, view in enumerate(("thyroid_transverse", "lung", "cardiac_4ch")):
        loop = simulate_loop(
            view, vendor=TRAINING_VENDORS[i], rng=rng, n_frames=24, size=(240, 320)
        )
        pixels = np.stack(
            [
                np.repeat(f.pixels[..., None], 3, axis=2) if f.pixels.ndim == 2 else f.pixels
                for f in loop
            ]
        )
        instance = DecodedInstance.from_pixels(
            pixels, sop_instance_uid=f"1.2.3.{i}", manufacturer=TRAINING_VENDORS[i]
        )
        qc = InstanceQC(
            QCOutcome.PASS,
            (),
            tuple(range(24)),
            scan_region=loop[0].scan_bbox,
            scan_mask=loop[0].scan_mask,
        )
        result = Analyser([pack], max_frames=8).analyse_study(
            "1.2.3", [PreparedInstance(instance, qc)]
        )
        image = result.images[0]
        assert image.frames_used == 8 and image.frames_total == 24
        assert image.view is not None and image.quality_score is not None
        correct += image.view.label == view
    assert correct >= 2
