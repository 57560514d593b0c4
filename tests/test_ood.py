"""Out-of-distribution scores: the energy method of the pack format, and how well each pack's
score separates familiar from unfamiliar input (AUROC better than chance on small samples;
``bench/ood.py`` measures the same on more frames and prints the table).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from modelkit.pack_writer import write_pack
from modelkit.testing import StubNet, prepared_instance, tiny_manifest
from workers.models.inference import Analyser
from workers.models.manifest import Manifest, OODMethod, PackFormatError, read_manifest
from workers.models.ood import EnergyScorer, MahalanobisScorer
from workers.models.packs import ModelPack

ROOT = Path(__file__).resolve().parents[1]
SONONET_DIR = Path(os.environ.get("SONONODE_SONONET_DIR", ROOT.parent / "shared" / "sononet"))
NPZ = SONONET_DIR / "SonoNet16.npz"
REFERENCE_PACK = ROOT / "deploy" / "models" / "sononode-us-sim"


def _bench() -> ModuleType:
    """``bench/ood.py``, whose frame builders the tests share (bench is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_ood", ROOT / "bench" / "ood.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _energy_manifest(**ood: Any) -> dict[str, Any]:
    manifest = tiny_manifest()
    manifest["ood"] = {"method": "energy", "threshold": -3.0, "tpr": 0.95, **ood}
    manifest["members"] = [{"weights": "w.pt", "sha256": "0" * 64}]
    manifest["format_version"] = 1
    return manifest


# ---------------------------------------------------------------------------------------
# The energy method in the pack format
# ---------------------------------------------------------------------------------------
def test_energy_is_minus_logsumexp() -> None:
    logits = np.array(
        [[8.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.5, -1.0]]
    )
    scorer = EnergyScorer(task="view", output="view")
    expected = -torch.logsumexp(torch.tensor(logits), dim=1).numpy()
    np.testing.assert_allclose(scorer.score_logits(logits), expected, rtol=1e-6)
    # A confident frame is more familiar (lower energy) than a flat one.
    assert scorer.score_logits(logits)[0] < scorer.score_logits(logits)[1]
    hot = EnergyScorer(task="view", output="view", temperature=2.0)
    np.testing.assert_allclose(
        hot.score_logits(logits), -2.0 * torch.logsumexp(torch.tensor(logits) / 2.0, 1).numpy()
    )
    # Ensemble: the mean of the members' energies.
    members = [{"view": logits}, {"view": logits + 1.0}]
    np.testing.assert_allclose(scorer.score_outputs(members), expected - 0.5, rtol=1e-6)
    with pytest.raises(PackFormatError, match="needs output 'view'"):
        scorer.score_outputs([{"logits": logits}])
    with pytest.raises(ValueError, match="positive"):
        EnergyScorer(task="view", output="view", temperature=0.0)


def test_energy_manifest_is_validated() -> None:
    spec = Manifest.from_dict(_energy_manifest()).ood
    assert spec is not None and spec.method is OODMethod.ENERGY
    assert spec.task == "view" and spec.temperature == 1.0 and spec.threshold == -3.0
    assert spec.stats is None and spec.sha256 is None

    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "odin"}, r"ood\.method must be one of mahalanobis, energy, got 'odin'"),
        ({"stats": "o.npz"}, r"ood\.stats applies to method 'mahalanobis' only"),
        ({"task": "quality"}, r"ood\.task must name a classification task .*'quality'"),
        ({"task": "nope"}, r"ood\.task must name a classification task"),
        ({"temperature": 0.0}, r"ood\.temperature must be within"),
        ({"threshold": None}, r"ood\.threshold is missing"),
        ({"threshold": "low"}, r"ood\.threshold must be a finite number"),
    ]
    for change, message in cases:
        with pytest.raises(PackFormatError, match=message):
            Manifest.from_dict(_energy_manifest(**change))
    mahalanobis = _energy_manifest(
        method="mahalanobis", stats="o.npz", sha256="0" * 64, threshold=3.0, task="view"
    )
    with pytest.raises(PackFormatError, match=r"ood\.task applies to method 'energy' only"):
        Manifest.from_dict(mahalanobis)
    del mahalanobis["ood"]["task"]
    assert Manifest.from_dict(mahalanobis).ood.method is OODMethod.MAHALANOBIS  # type: ignore[union-attr]


def _stub(manifest: dict[str, Any], view: Callable[[torch.Tensor], torch.Tensor]) -> ModelPack:
    """A pack whose view logits are ``view(mean input)``, its OOD scorer from the manifest."""
    logits = {"view": view, "nodule": np.zeros(3), "lung_pattern": np.zeros(3)}
    return ModelPack(Manifest.from_dict(manifest), [StubNet(logits)], device="cpu")


def _confident_when_bright(mean: torch.Tensor) -> torch.Tensor:
    confident = torch.tensor([0.0, 9.0, 0.0, 0.0, 0.0])
    flat = torch.zeros(5)
    return torch.where(mean[:, None] > 0, confident, flat)


def test_energy_pack_writes_loads_and_scores(tmp_path: Path) -> None:
    from workers.models.nets import MultiTaskMobileNet

    manifest = tiny_manifest()
    manifest["ood"] = {"method": "energy", "threshold": -2.5, "tpr": 0.95, "fitted_on": "tests"}
    torch.manual_seed(0)
    net = MultiTaskMobileNet(width=0.25)
    folder = write_pack(tmp_path / "energy", manifest, [net.state_dict()])
    written = read_manifest(folder).raw
    assert written["ood"]["method"] == "energy" and written["ood"]["fitted_on"] == "tests"
    assert not (folder / "ood_stats.npz").exists()
    pack = ModelPack.load(folder, device="cpu")
    assert isinstance(pack.ood, EnergyScorer) and pack.ood.output == "view"
    frames = [np.random.default_rng(i).random((96, 128)).astype(np.float32) for i in range(4)]
    prediction = pack.predict(frames)
    raw = pack.raw_outputs(frames)
    expected = -torch.logsumexp(torch.from_numpy(raw[0]["view"]), dim=1).numpy()
    assert prediction.ood_score is not None
    np.testing.assert_allclose(prediction.ood_score, expected, rtol=1e-5)
    # Rewriting the pack with its scorer keeps the block; a Mahalanobis scorer cannot be
    # slipped under an energy manifest.
    again = write_pack(tmp_path / "again", dict(pack.manifest.raw), [net.state_dict()],
                       ood=pack.ood)
    assert json.loads((again / "manifest.json").read_text())["ood"]["task"] == "view"
    with pytest.raises(PackFormatError, match=r"stats applies to method 'mahalanobis'"):
        write_pack(tmp_path / "mixed", manifest, [net.state_dict()],
                   ood=MahalanobisScorer(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="does not match the manifest"):
        ModelPack(pack.manifest, [net], ood=MahalanobisScorer(np.zeros(4), np.eye(4)), device="cpu")


def test_analyser_withholds_the_view_of_high_energy_frames() -> None:
    pack = _stub(_energy_manifest(), _confident_when_bright)
    bright = prepared_instance(grey=220, uid="1.2.826.0.1.3680043.8.498.11")
    dark = prepared_instance(grey=10, uid="1.2.826.0.1.3680043.8.498.12")
    result = Analyser([pack]).analyse_study("1.2.3", [bright, dark])
    familiar, strange = result.images
    assert familiar.ood_score is not None and familiar.ood_score < -8.0
    assert not familiar.out_of_distribution and familiar.view is not None
    assert familiar.view.label == "thyroid_transverse" and not familiar.view.abstained
    assert strange.out_of_distribution and strange.ood_score is not None
    assert strange.ood_score == pytest.approx(-np.log(5.0), abs=1e-4)
    assert strange.view is not None and strange.view.abstained
    assert "energy score -1.61, threshold -3.00" in (strange.view.reason or "")
    assert strange.needs_review and result.needs_review
    assert "out of distribution: 1" in result.review_reasons[0]


# ---------------------------------------------------------------------------------------
# AUROC on small samples (bench/ood.py prints the full table)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _bench()


@pytest.fixture(scope="module")
def sononet(tmp_path_factory: pytest.TempPathFactory) -> ModelPack:
    if not NPZ.is_file():
        pytest.skip(f"SonoNet weights not found at {NPZ} (set SONONODE_SONONET_DIR)")
    from modelkit.sononet_import import import_sononet

    folder = import_sononet(NPZ, tmp_path_factory.mktemp("packs") / "sononet16")
    return ModelPack.load(folder, device="cpu")


@pytest.fixture(scope="module")
def fetal_scores(bench: ModuleType, sononet: ModelPack) -> np.ndarray:
    from modelkit.sononet_import import EXAMPLES_FOLDER, read_examples

    folder = SONONET_DIR / EXAMPLES_FOLDER
    if not folder.is_dir():
        pytest.skip(f"SonoNet example frames not found in {folder}")
    frames = bench.fetal_frames(read_examples(folder), augmentations=1)
    assert len(frames) == 10
    return np.asarray(bench.ood_scores(sononet, frames))


@pytest.mark.sononet
def test_sononet_energy_separates_other_modalities(
    bench: ModuleType, sononet: ModelPack, fetal_scores: np.ndarray
) -> None:
    from workers.models.manifest import Region

    frames, sources = bench.other_modality_frames(Region.SCAN_REGION)
    assert sources >= 5 and len(frames) == sources  # CT, MR, NM, RT image: local files only
    assert bench.auroc(fetal_scores, bench.ood_scores(sononet, frames)) > 0.5


@pytest.mark.sononet
def test_sononet_energy_separates_non_fetal_ultrasound(
    bench: ModuleType, sononet: ModelPack, fetal_scores: np.ndarray
) -> None:
    from simulator import VENDOR_STYLES

    frames = bench.simulated_frames(sorted(VENDOR_STYLES)[:2], per_view=1, seed=7)
    assert len(frames) >= 8
    assert bench.auroc(fetal_scores, bench.ood_scores(sononet, frames)) > 0.5


def test_reference_pack_flags_its_held_out_vendor(bench: ModuleType) -> None:
    pack = ModelPack.load(REFERENCE_PACK, device="cpu")
    training = pack.manifest.raw["training_data"]
    held_out, seen = training["held_out_vendor"], training["vendors"]
    assert held_out not in seen
    inside = bench.simulated_frames(seen, per_view=2, seed=31)
    outside = bench.simulated_frames([held_out] * 2, per_view=2, seed=32)
    assert len(inside) >= 30 and len(outside) >= 15
    auroc = bench.auroc(bench.ood_scores(pack, inside), bench.ood_scores(pack, outside))
    assert auroc > 0.5
    # The image statistics see what the embedding was trained to ignore: the held-out
    # vendor's grey map and speckle (bench/ood.py: AUROC on more frames).
    def image(frames: list[np.ndarray]) -> np.ndarray:
        views = pack.predicted_views(pack.predict(frames).probabilities)
        scores = pack.image_ood_scores(frames, views)
        assert scores is not None
        return scores

    assert pack.image_ood is not None
    assert bench.auroc(image(inside), image(outside)) > 0.85
    # Through the Analyser: the node withholds far more of the held-out vendor's views.
    assert bench.abstained(pack, outside) > bench.abstained(pack, inside) + 0.3
