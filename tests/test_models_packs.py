"""Model pack loading: integrity, manifest validation, provenance, batching."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_sr.codes import SIMULATED_SUFFIX
from modelkit.testing import write_tiny_pack
from workers.models.manifest import FORMAT_VERSION, PackFormatError, PackIntegrityError
from workers.models.packs import ModelPack
from workers.models.preprocess import to_unit_grey


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pack(tmp_path_factory.mktemp("packs") / "tiny")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_pack_loads_and_verifies(pack_dir: Path) -> None:
    pack = ModelPack.load(pack_dir, device="cpu")
    assert pack.manifest.raw["format_version"] == FORMAT_VERSION
    assert pack.view_task is not None and pack.view_task.name == "view"
    # The name is the pack's own; the SR builder adds the disclaimer to it, once.
    assert pack.algorithm.name == pack.manifest.name
    assert SIMULATED_SUFFIX.strip() not in pack.algorithm.name
    assert pack.algorithm.simulated_training_data is True
    assert len(pack.algorithm.sha256) == 64


def test_tampered_weights_are_refused(pack_dir: Path, tmp_path: Path) -> None:
    folder = _copy(pack_dir, tmp_path / "tampered")
    weights = folder / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackIntegrityError, match=r"sha256 of weights\.pt .* refusing"):
        ModelPack.load(folder, device="cpu")


def test_missing_weights_file_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    folder = _copy(pack_dir, tmp_path / "missing")
    (folder / "ood_stats.npz").unlink()
    with pytest.raises(PackIntegrityError, match=r"ood_stats\.npz .* missing"):
        ModelPack.load(folder, device="cpu")


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackFormatError, match=r"no manifest\.json"):
        ModelPack.load(tmp_path, device="cpu")


def test_invalid_json_is_refused(pack_dir: Path, tmp_path: Path) -> None:
    folder = _copy(pack_dir, tmp_path / "badjson")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(PackFormatError, match=r"cannot read manifest\.json"):
        ModelPack.load(folder, device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("tasks"), r"manifest\.json\.tasks is missing"),
        (
            lambda d: d["training_data"].pop("simulated"),
            r"training_data\.simulated must be true or false",
        ),
        (lambda d: d.pop("license"), r"\.license is missing"),
        (
            lambda d: d["tasks"]["view"]["labels"][0]["code"].pop("value"),
            r"labels\[0\]\.code\.value is missing",
        ),
        (
            lambda d: d.__setitem__("format_version", 99),
            "format_version is 99; this node reads format 1",
        ),
        (lambda d: d["architecture"].__setitem__("name", "resnet"), "'resnet' is not one of"),
        (
            lambda d: d["tasks"]["nodule"]["applies_to"].__setitem__("view", ["knee"]),
            "unknown views",
        ),
        (
            lambda d: d["tasks"]["view"]["calibration"].__setitem__("temperature", [1.0, 2.0]),
            "one per member",
        ),
        (
            lambda d: d["members"][0].__setitem__("weights", "../x.pt"),
            "must be a path inside the pack",
        ),
        (
            lambda d: d["tasks"]["nodule"]["operating_point"].__setitem__("label", "cyst"),
            "'cyst' is not one of",
        ),
        (
            lambda d: d["input"].__setitem__(
                "layouts", [{"rows": 100, "columns": 200, "crop": [0, 0, 201, 50]}]),
            r"layouts\[0\]\.crop must be \[column0, row0, column1, row1\] integers inside",
        ),
        (
            lambda d: d["input"].update(
                region="full_frame",
                layouts=[{"rows": 100, "columns": 200, "crop": [0, 0, 200, 50]}]),
            "layouts needs region 'scan_region'",
        ),
    ],
)
def test_invalid_manifest_is_refused_with_clear_message(
    pack_dir: Path,
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], object],
    message: str,
) -> None:
    folder = _copy(pack_dir, tmp_path / "edited")
    _edit_manifest(folder, edit)
    with pytest.raises(PackFormatError, match=message):
        ModelPack.load(folder, device="cpu")


def test_weights_that_do_not_fit_are_format_errors(pack_dir: Path, tmp_path: Path) -> None:
    folder = _copy(pack_dir, tmp_path / "width")
    _edit_manifest(folder, lambda d: d["architecture"]["params"].__setitem__("width", 0.5))
    with pytest.raises(PackFormatError, match="do not fit architecture"):
        ModelPack.load(folder, device="cpu")


def test_batched_and_unbatched_outputs_agree(pack_dir: Path) -> None:
    pack = ModelPack.load(pack_dir, device="cpu")
    rng = np.random.default_rng(1)
    frames = [rng.random((90 + 7 * i, 120 + 3 * i), dtype=np.float32) for i in range(7)]
    one = pack.predict(frames, batch_size=1)
    many = pack.predict(frames, batch_size=32)
    for task in one.probabilities:
        np.testing.assert_allclose(one.probabilities[task], many.probabilities[task], atol=1e-5)
        np.testing.assert_allclose(one.probabilities[task].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one.values["quality"], many.values["quality"], atol=1e-5)
    np.testing.assert_allclose(one.embedding, many.embedding, atol=1e-4)
    assert one.ood_score is not None and one.ood_score.shape == (7,)
    assert len(many) == 7


def test_ensemble_averages_member_probabilities(tmp_path: Path) -> None:
    folder = write_tiny_pack(tmp_path / "ens", n_members=2)
    pack = ModelPack.load(folder, device="cpu")
    assert len(pack.networks) == 2
    frames = [np.random.default_rng(0).random((64, 80), dtype=np.float32)]
    raw = pack.raw_outputs(frames)
    pred = pack.calibrate_outputs(raw)
    from workers.models.packs import softmax

    expected = (softmax(raw[0]["view"]) + softmax(raw[1]["view"])) / 2
    np.testing.assert_allclose(pred.probabilities["view"], expected, atol=1e-6)


def test_frames_must_be_unit_range_or_uint8() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_unit_grey(np.full((10, 10), 200.0, np.float32))
    assert to_unit_grey(np.full((10, 10, 3), 255, np.uint8)).max() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="shape"):
        to_unit_grey(np.zeros((2, 3, 4, 5), np.float32))


def test_each_pack_states_when_it_abstains(pack_dir: Path) -> None:
    """One rule per pack, from its manifest: QC, the OOD threshold, the labels never
    reported, operating points and confidence floors, drift; served by /models."""
    from workers.models.manifest import (
        TaskKind,
        abstention_rules,
        describe_packs,
        read_manifest,
    )

    manifest = read_manifest(pack_dir)
    rules = abstention_rules(manifest)
    assert rules[0].startswith("QC fails the image")
    assert rules[-1].startswith("While the vendor, scanner and pack are in drift alert")
    if manifest.ood is None:
        assert any("No out-of-distribution detector" in r for r in rules)
    else:
        assert any(f"above {manifest.ood.threshold:g}" in r for r in rules)
    for task in manifest.tasks.values():
        if task.kind is not TaskKind.CLASSIFICATION:
            continue  # a quality score is recorded, never decided on
        title = task.name.replace("_", " ").capitalize()
        assert any(r.startswith(f"{title} below {task.threshold:.0%} probability")
                   for r in rules), task.name
        if task.operating_point is not None:
            assert any(f"at least {task.operating_point.threshold:.1%}" in r for r in rules)
    (entry,) = describe_packs([pack_dir])
    assert entry["abstention"] == rules
