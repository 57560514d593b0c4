"""SonoNet-16 on the published weights and the authors' example frames.

Needs ``../shared/sononet`` (``SONONODE_SONONET_DIR`` overrides it): the weights are data
from elsewhere and never part of the repository; the tests skip cleanly without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.models.sononet import (
    ABSTAIN_LABEL,
    AUTHORS_CROP,
    INPUT_SIZE,
    SONONET_LABELS,
    SonoNet16,
    find_scan_region,
    import_sononet,
    load_npz_state_dict,
    load_sononet,
    localise,
    main,
    preprocess,
    resolve_region,
)

pytestmark = pytest.mark.sononet

SONONET_DIR = Path(
    os.environ.get(
        "SONONODE_SONONET_DIR", Path(__file__).resolve().parents[2] / "shared" / "sononet"
    )
)
NPZ = SONONET_DIR / "SonoNet16.npz"
EXAMPLES = SONONET_DIR / "example_images"
#: Example file stem -> label in SONONET_LABELS.
EXPECTED = {
    "4CH": "4CH",
    "BRAIN-TV": "Brain (Tv.)",
    "KIDNEYS": "Kidneys",
    "PROFILE": "Profile",
    "SPINE-CORONAL": "Spine (cor.)",
}

needs_weights = pytest.mark.skipif(
    not NPZ.is_file(), reason=f"SonoNet weights not found at {NPZ} (set SONONODE_SONONET_DIR)"
)
needs_examples = pytest.mark.skipif(
    not all((EXAMPLES / f"{name}.tiff").is_file() for name in EXPECTED),
    reason=f"SonoNet example frames not found in {EXAMPLES}",
)


@pytest.fixture(scope="module")
def model() -> SonoNet16:
    torch.manual_seed(0)
    return load_sononet(NPZ)


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    tifffile = pytest.importorskip("tifffile")
    return {name: tifffile.imread(EXAMPLES / f"{name}.tiff") for name in EXPECTED}


def _run(model: SonoNet16, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model(batch)


# ---------------------------------------------------------------------------------------
# Without the weights
# ---------------------------------------------------------------------------------------
def test_labels_and_shapes_without_weights() -> None:
    assert len(SONONET_LABELS) == 14
    assert SONONET_LABELS[3] == ABSTAIN_LABEL == "Background"
    net = SonoNet16().eval()
    out = _run(net, torch.zeros(2, 1, *INPUT_SIZE))
    assert out["logits"].shape == (2, 14)
    assert out["class_maps"].shape == (2, 14, 14, 18)
    assert out["embedding"].shape == (2, 64)
    torch.testing.assert_close(out["probabilities"].sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        net(torch.zeros(1, 3, *INPUT_SIZE))


def test_wrong_shaped_npz_refused(tmp_path: Path) -> None:
    net = SonoNet16()
    arrays = {}
    for i, (_, layer) in enumerate(net.layers_in_npz_order()):
        c = layer.conv.out_channels
        arrays[f"arr_{5 * i}"] = np.zeros(tuple(layer.conv.weight.shape), np.float32)
        for k in range(1, 5):
            arrays[f"arr_{5 * i + k}"] = np.ones(c, np.float32)
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    assert set(load_npz_state_dict(good)) == set(net.state_dict())

    bad = dict(arrays, arr_70=np.zeros((14, 128, 1, 1), np.float32))
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"arr_70 .*classifier.* shape \(14, 128, 1, 1\)"):
        load_npz_state_dict(tmp_path / "bad.npz")

    short = {k: v for k, v in arrays.items() if k != "arr_74"}
    np.savez(tmp_path / "short.npz", **short)
    with pytest.raises(ValueError, match="expected the 75 arrays"):
        load_npz_state_dict(tmp_path / "short.npz")

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable npz"):
        load_npz_state_dict(tmp_path / "junk.npz")
    assert main([str(tmp_path / "bad.npz"), "--out", str(tmp_path / "pack")]) == 1
    assert not (tmp_path / "pack").exists()


def test_preprocess_contract() -> None:
    rng = np.random.default_rng(0)
    frame = np.zeros((300, 400, 3), np.uint8)
    frame[50:280, 60:380] = rng.integers(0, 255, (230, 320, 1), np.uint8)
    x = preprocess(frame, (60, 50, 380, 280))
    assert x.shape == (1, *INPUT_SIZE) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-2
    assert float(x.std(unbiased=False)) == pytest.approx(255.0, rel=1e-3)
    region = find_scan_region(frame)
    assert region is not None
    c0, r0, c1, r1 = region
    assert abs(c0 - 60) <= 3 and abs(r0 - 50) <= 3 and abs(c1 - 380) <= 3 and abs(r1 - 280) <= 3
    assert find_scan_region(np.zeros((300, 400, 3), np.uint8)) is None
    assert resolve_region(np.zeros((300, 400, 3), np.uint8), None) == (0, 0, 400, 300)
    with pytest.raises(ValueError, match="at least 16 x 16"):
        preprocess(frame, (10, 10, 12, 200))
    with pytest.raises(TypeError, match="uint8"):
        preprocess(frame.astype(np.float32), None)


# ---------------------------------------------------------------------------------------
# With the published weights and example frames
# ---------------------------------------------------------------------------------------
@needs_weights
@needs_examples
@pytest.mark.parametrize("crop", ["authors", "detected"])
def test_examples_classified(model: SonoNet16, frames: dict[str, np.ndarray], crop: str) -> None:
    names = list(EXPECTED)
    batch = torch.stack(
        [preprocess(frames[n], AUTHORS_CROP if crop == "authors" else None) for n in names]
    )
    probabilities = _run(model, batch)["probabilities"]
    for name, row in zip(names, probabilities, strict=True):
        predicted = SONONET_LABELS[int(row.argmax())]
        assert predicted == EXPECTED[name], f"{name} ({crop} crop): {predicted} {row.tolist()}"
        assert float(row.max()) > 0.9


@needs_weights
@needs_examples
def test_outputs_stable_between_runs(model: SonoNet16, frames: dict[str, np.ndarray]) -> None:
    batch = torch.stack([preprocess(f, None) for f in frames.values()])
    first = _run(model, batch)
    again = load_sononet(NPZ)
    second = _run(again, batch.clone())
    for key in ("logits", "probabilities", "class_maps", "embedding"):
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-4)
    single = _run(model, batch[:1])
    torch.testing.assert_close(single["logits"], first["logits"][:1], rtol=0, atol=1e-4)


@needs_weights
@needs_examples
def test_localise_inside_scan_region(model: SonoNet16, frames: dict[str, np.ndarray]) -> None:
    for name, frame in frames.items():
        region = resolve_region(frame, None)
        out = _run(model, preprocess(frame, region)[None])
        index = int(out["logits"][0].argmax())
        c0, r0, c1, r1 = localise(out["class_maps"], index, frame.shape, region)
        rc0, rr0, rc1, rr1 = region
        assert rc0 <= c0 < c1 <= rc1 and rr0 <= r0 < r1 <= rr1, name
        area = (c1 - c0) * (r1 - r0)
        assert 0 < area < (rc1 - rc0) * (rr1 - rr0), name


@needs_weights
def test_import_writes_verified_pack(tmp_path: Path) -> None:
    from workers.models.packs import ModelPack, sha256_file

    out = tmp_path / "sononet16"
    assert main([str(NPZ), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (member,) = manifest["members"]
    assert sha256_file(out / member["weights"]) == member["sha256"]
    assert manifest["architecture"]["name"] == "sononet16"
    view = manifest["tasks"]["view"]
    assert [label["name"] for label in view["labels"]] == list(SONONET_LABELS)
    assert view["abstain_labels"] == ["Background"]
    assert manifest["training_data"]["simulated"] is False
    assert manifest["license"] == "Apache-2.0" and "1612.05601" in manifest["citation"]
    state = torch.load(out / "weights.pt", weights_only=True)
    expected = load_npz_state_dict(NPZ)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value)
    pack = ModelPack.load(out, device="cpu")
    assert pack.view_task is not None and pack.view_task.label_names == SONONET_LABELS
    assert import_sononet(NPZ, out) == out  # re-import replaces the pack


@needs_weights
@needs_examples
def test_pack_predicts_examples(tmp_path: Path, frames: dict[str, np.ndarray]) -> None:
    """The node's own pipeline (luma grey, per_image, input_scale) agrees with the authors'."""
    from workers.models.packs import ModelPack

    pack = ModelPack.load(import_sononet(NPZ, tmp_path / "pack"), device="cpu")
    crops = []
    for frame in frames.values():
        c0, r0, c1, r1 = resolve_region(frame, None)
        crops.append(frame[r0:r1, c0:c1])
    probabilities = pack.predict(crops).probabilities["view"]
    predicted = [SONONET_LABELS[int(i)] for i in probabilities.argmax(axis=1)]
    assert predicted == list(EXPECTED.values())
