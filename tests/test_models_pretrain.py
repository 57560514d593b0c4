"""Contrastive pretraining on unlabelled loops: pairs, loss, learning, the backbone on disk,
``sononode model pretrain`` and ``train --from-pretrained``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.cli import main
from modelkit.loops import LoopSet, read_loop_folder
from modelkit.pretrain import (
    INFO_FILE,
    WEIGHTS_FILE,
    load_pretrained,
    nt_xent,
    positive_pairs,
    pretrain_backbone,
    write_pretrained,
)
from modelkit.train import default_input_spec
from workers.models.manifest import InputSpec, NormalisationMode, PackIntegrityError
from workers.models.nets import MultiTaskMobileNet
from workers.models.packs import ModelPack

needs_simulator = pytest.mark.skipif(
    importlib.util.find_spec("simulator") is None, reason="simulator missing"
)

SMALL = InputSpec(height=48, width=64, normalisation=NormalisationMode.FIXED, mean=0.3,
                  std=0.25)


def disc_loops(n_loops: int, frames: int, *, seed: int) -> LoopSet:
    """Loops of one to four bright discs each (sizes and grey levels drawn per loop),
    drifting a pixel or so per frame: a probe moving over one anatomy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SMALL.height, 0 : SMALL.width]
    images = []
    for _ in range(n_loops):
        count = int(rng.integers(1, 5))
        radius = rng.uniform(3, 12, count)
        centre = rng.uniform([10, 10], [38, 54], (count, 2))
        level = rng.uniform(0.3, 1.0, count)
        drift = rng.normal(0, 1.0, 2)
        for k in range(frames):
            image = np.full((SMALL.height, SMALL.width), 0.1, np.float32)
            for c, r, v in zip(centre + k * drift, radius, level, strict=True):
                image[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r] = v
            images.append(torch.from_numpy((image * 255).round().astype(np.uint8)))
    return LoopSet(
        images=torch.stack(images),
        loop=torch.arange(n_loops).repeat_interleave(frames),
        vendor=["Test"] * n_loops,
    )


def test_nt_xent_is_low_for_matching_pairs_and_at_chance_for_unrelated_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=generator)
    chance = math.log(2 * 32 - 1)
    matching = float(nt_xent(z1, z1 + 0.05 * torch.randn(32, 16, generator=generator)))
    unrelated = float(nt_xent(z1, torch.randn(32, 16, generator=generator), temperature=10.0))
    swapped = float(nt_xent(z1, z1.roll(1, 0)))
    assert matching < 0.2 * chance
    assert unrelated == pytest.approx(chance, rel=0.02)
    assert swapped > chance  # each view's most similar other view is not its partner
    with pytest.raises(ValueError, match="B >= 2"):
        nt_xent(z1[:1], z1[:1])


def test_a_positive_pair_mixes_frames_of_one_loop_and_a_batch_has_one_pair_per_loop() -> None:
    # Loop i: every frame a flat grey between 20 i and 20 i + 9.
    n_loops, frames = 10, 4
    values = torch.tensor([20 * i + k * 3 for i in range(n_loops) for k in range(frames)])
    loops = LoopSet(
        images=values.to(torch.uint8)[:, None, None].expand(-1, 6, 8).contiguous(),
        loop=torch.arange(n_loops).repeat_interleave(frames),
        vendor=["Test"] * n_loops,
    )
    first, second = positive_pairs(loops, 6, torch.Generator().manual_seed(1))
    assert first.shape == second.shape == (6, 1, 6, 8)
    grey = first.mean(dim=(1, 2, 3)) * 255
    partner = second.mean(dim=(1, 2, 3)) * 255
    origin = (grey // 20).long()
    assert len(set(origin.tolist())) == 6  # six distinct loops: no negative from the same loop
    assert torch.equal((partner // 20).long(), origin)  # both views from the same loop
    assert bool(((grey - 20 * origin) <= 9.001).all())  # mixes of that loop's frames only


def test_a_loop_set_keeps_loops_whole() -> None:
    loops = disc_loops(20, 3, seed=0)
    rest, held = loops.split(0.25, seed=0)
    assert (rest.loops, held.loops) == (15, 5)
    assert len(rest) + len(held) == len(loops)
    rest_frames = {bytes(x.numpy()) for x in rest.images}
    assert not rest_frames & {bytes(x.numpy()) for x in held.images}
    with pytest.raises(ValueError, match="contiguous"):
        LoopSet(images=loops.images[:4], loop=torch.tensor([0, 1, 0, 1]), vendor=["a", "b"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        LoopSet(images=loops.images[:3], loop=torch.tensor([0, 0, 1]), vendor=["a", "b"])


def test_pretraining_learns_pairs_of_loops_it_never_saw_through_the_backbone_only() -> None:
    # Without augmentation, to learn within seconds on tiny images; that pairs are learnt
    # under the ultrasound augmentations is bench/pretrain.py's figure (held-out simulated
    # loops, identified 0.04 -> 0.44 with chance 0.02).
    loops, unseen = disc_loops(48, 4, seed=1), disc_loops(16, 4, seed=2)
    torch.manual_seed(0)
    net = MultiTaskMobileNet(width=0.25, output_stride=32)
    heads = {k: v.clone() for k, v in net.heads.state_dict().items()}
    report = pretrain_backbone(net, loops, spec=SMALL, steps=40, batch_loops=16, lr=3e-3,
                               validation=unseen, seed=0, progress=False,
                               augmentation=lambda x, _generator: x)
    assert report.before is not None and report.after is not None
    assert report.after.pairs == report.before.pairs == 64
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])
    assert report.after.loss < report.before.loss - 0.2
    assert report.after.pair_accuracy > 4 * report.after.chance
    for key, value in net.heads.state_dict().items():
        assert torch.equal(value, heads[key]), key
    assert not net.training


def test_the_backbone_on_disk_is_verified_and_loads_exactly(tmp_path: Path) -> None:
    loops = disc_loops(8, 3, seed=3)
    net = MultiTaskMobileNet(width=0.25, output_stride=32)
    report = pretrain_backbone(net, loops, spec=SMALL, steps=2, batch_loops=4,
                               progress=False)
    folder = write_pretrained(tmp_path / "b", net, spec=SMALL, output_stride=32, report=report,
                              data={"source": "test", "loops": 8}, batch_loops=4)
    backbone = load_pretrained(folder)
    assert (backbone.width, backbone.output_stride, backbone.input) == (0.25, 32, SMALL)
    loaded = backbone.network(pool="avgmax")
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    assert backbone.summary()["sha256"] == json.loads(
        (folder / INFO_FILE).read_text())["sha256"]
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackIntegrityError, match="sha256"):
        load_pretrained(folder)


@needs_simulator
def test_every_multi_frame_file_of_a_folder_is_a_loop(tmp_path: Path) -> None:
    from simulator import simulate_study

    study = simulate_study(tmp_path / "study", seed=4, vendor="Solace Systems", n_images=1,
                           n_loops=2, frames_per_loop=4)
    loops = read_loop_folder(study.out_dir, input_size=(48, 64))
    assert loops.loops == 2
    assert loops.skipped == 2  # the single-frame image and labels.csv
    assert loops.vendor == ["Solace Systems", "Solace Systems"]
    assert tuple(loops.images.shape[1:]) == (48, 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no multi-frame"):
        read_loop_folder(tmp_path / "empty", input_size=(48, 64))
    with pytest.raises(ValueError, match="not a folder"):
        read_loop_folder(tmp_path / "missing", input_size=(48, 64))


@needs_simulator
@pytest.mark.slow
def test_pretrain_then_fine_tune_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone = tmp_path / "backbone"
    assert main(["pretrain", "--simulated", "12", "--vendor", "Solace Systems",
                 "--frames-per-loop", "3", "--steps", "3", "--batch-loops", "4",
                 "--width", "0.25", "--output-stride", "32", "--out", str(backbone)]) == 0
    assert "held-out loops" in capsys.readouterr().out
    record = json.loads((backbone / INFO_FILE).read_text())
    assert record["data"]["labels_used"] is False
    assert record["data"]["simulated"] is True
    assert set(record["data"]["loops_per_vendor"]) == {"Solace Systems"}
    assert record["data"]["held_out_loops"] >= 2
    assert record["data"]["loops"] + record["data"]["held_out_loops"] + record["data"][
        "skipped_instances"] == 12
    assert record["input"]["height"] == default_input_spec().height

    pack = tmp_path / "pack"
    assert main(["train", "--simulated", "10", "--epochs", "1", "--seed", "2",
                 "--from-pretrained", str(backbone), "--out", str(pack)]) == 0
    loaded = ModelPack.load(pack, device="cpu")
    assert loaded.manifest.architecture_params["width"] == 0.25
    assert "pretrained contrastively" in loaded.manifest.raw["training_data"]["description"]
    assert (loaded.manifest.raw["training_data"]["pretrained_backbone"]["sha256"]
            == record["sha256"])

    with pytest.raises(SystemExit, match="not both"):
        main(["train", "--simulated", "10", "--from-pretrained", str(backbone),
              "--init-from", str(pack), "--out", str(tmp_path / "x")])
    (backbone / WEIGHTS_FILE).write_bytes(b"garbage")
    assert main(["train", "--simulated", "10", "--from-pretrained", str(backbone),
                 "--out", str(tmp_path / "y")]) == 2
    assert "sha256" in capsys.readouterr().err
