"""Training: the loss goes down, augmentation keeps the frame, splits are by study, and the
training frames are pre-processed exactly as the node pre-processes frames at inference."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from modelkit.data import (
    FrameSet,
    node_input,
    simulate_frameset,
    split_by_study,
)
from modelkit.train import augment, multitask_loss, train_network
from workers.imaging.qc import assess_instance
from workers.imaging.types import PreparedInstance
from workers.models.manifest import InputSpec, Region
from workers.models.nets import MultiTaskMobileNet, build_network, count_parameters
from workers.models.preprocess import model_input, preprocess

needs_simulator = pytest.mark.skipif(
    importlib.util.find_spec("simulator") is None, reason="simulator missing"
)

SPEC = InputSpec(height=48, width=64, mean=0.3, std=0.25)


def toy_frames(n: int = 192, seed: int = 0) -> FrameSet:
    """View k is a bright band at row position k; nodule on 'thyroid' bands by band width."""
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 5, n)
    images = rng.integers(0, 60, (n, 48, 64)).astype(np.uint8)
    for i, v in enumerate(view):
        images[i, 4 + 8 * v : 10 + 8 * v, :] = 220
    nodule = np.where(np.isin(view, [1, 2]), rng.integers(0, 3, n), -1)
    for j in np.nonzero(nodule >= 0)[0]:
        images[j, 30:40, 8 : 8 + 16 * (nodule[j] + 1)] = 255
    lung = np.full(n, -1)
    return FrameSet(
        images=torch.from_numpy(images),
        labels={
            "view": torch.from_numpy(view),
            "nodule": torch.from_numpy(nodule),
            "lung_pattern": torch.from_numpy(lung),
        },
        quality=torch.from_numpy((view / 4).astype(np.float32)),
        vendor=["A" if i % 2 else "B" for i in range(n)],
        study=torch.from_numpy(np.arange(n) // 4),
    )


def _loss(net: MultiTaskMobileNet, frames: FrameSet) -> float:
    net.eval()
    with torch.no_grad():
        x = (frames.unit_float() - SPEC.mean) / SPEC.std
        loss, _ = multitask_loss(net(x), frames.labels, frames.quality)
    return float(loss)


def test_network_outputs_and_width() -> None:
    net = MultiTaskMobileNet(width=1.0)
    small = MultiTaskMobileNet(width=0.5)
    assert 200_000 < count_parameters(net) < 1_500_000
    assert count_parameters(small) < count_parameters(net) / 2
    out = small.eval()(torch.zeros(2, 1, 128, 160))
    assert out["view"].shape == (2, 5)
    assert out["nodule"].shape == (2, 3) and out["lung_pattern"].shape == (2, 3)
    assert out["quality"].shape == (2,) and out["embedding"].shape == (2, small.embedding_dim)


def test_training_a_few_steps_lowers_the_loss() -> None:
    frames = toy_frames()
    torch.manual_seed(0)
    net = MultiTaskMobileNet(width=0.25, dropout=0.0)
    before = _loss(net, frames)
    report = train_network(
        net, frames, epochs=8, batch_size=32, lr=1e-2, seed=0, spec=SPEC, progress=False
    )
    after = _loss(net, frames)
    assert report.frames_seen == 8 * len(frames)
    assert after < 0.7 * before, (before, after, report.epoch_loss)


def test_augment_keeps_shape_and_range() -> None:
    x = torch.rand(8, 1, 48, 64)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(x, y)


def test_split_is_by_study() -> None:
    frames = toy_frames()
    parts = split_by_study(frames, [0.7, 0.15, 0.15], seed=1)
    studies = [set(p.study.tolist()) for p in parts]
    assert sum(len(p) for p in parts) == len(frames)
    assert not (studies[0] & studies[1]) and not (studies[0] & studies[2])
    assert not (studies[1] & studies[2])


def test_avgmax_pooling_keeps_the_embedding_and_widens_the_heads() -> None:
    avg = MultiTaskMobileNet(width=0.25)
    avgmax = MultiTaskMobileNet(width=0.25, pool="avgmax")
    avg_head, avgmax_head = avg.heads["nodule"], avgmax.heads["nodule"]
    assert isinstance(avg_head, nn.Linear) and isinstance(avgmax_head, nn.Linear)
    assert avgmax_head.in_features == 2 * avg_head.in_features
    out = avgmax.eval()(torch.zeros(2, 1, 64, 80))
    assert out["embedding"].shape == (2, avgmax.embedding_dim)
    with pytest.raises(ValueError, match="pool must be one of"):
        MultiTaskMobileNet(pool="median")
    with pytest.raises(ValueError, match="invalid parameters"):
        build_network("multitask_mobilenet", {"pooling": "avg"})


def test_output_stride_16_doubles_the_last_feature_map_and_keeps_the_weights() -> None:
    coarse = MultiTaskMobileNet(width=0.25)
    fine = MultiTaskMobileNet(width=0.25, output_stride=16)
    x = torch.zeros(1, 1, 128, 160)
    assert tuple(coarse.eval().backbone(x).shape[2:]) == (4, 5)
    assert tuple(fine.eval().backbone(x).shape[2:]) == (8, 10)
    # Same layers, only a stride differs: a pack's weights load into either.
    fine.load_state_dict(coarse.state_dict())
    built = build_network("multitask_mobilenet", {"width": 0.25, "output_stride": 16})
    assert isinstance(built, MultiTaskMobileNet)
    assert tuple(built.eval().backbone(x).shape[2:]) == (8, 10)
    with pytest.raises(ValueError, match="output_stride must be 16 or 32"):
        MultiTaskMobileNet(output_stride=8)


def _simulated_instance(view: str, seed: int) -> PreparedInstance:
    """One simulated frame the way the node receives it: DICOM dataset, decoded, QC'd."""
    from simulator import build_instance, new_study_context, simulate_image
    from workers.imaging.pixels import decode_dataset

    rng = np.random.default_rng(seed)
    frame = simulate_image(view, vendor="Aurora Imaging", rng=rng, size=(480, 640))
    study = new_study_context(rng, vendor="Aurora Imaging")
    dataset = build_instance(
        frame, vendor="Aurora Imaging", study=study, series_instance_uid="1.2.826.0.1.3680043.9"
    )
    instance = decode_dataset(dataset)
    return PreparedInstance(instance, assess_instance(instance))


@needs_simulator
def test_training_frames_are_what_the_node_shows_the_network() -> None:
    """Train/serve skew guard: ``node_input`` is the Analyser's own crop and resize."""
    item = _simulated_instance("cardiac_4ch", seed=3)
    assert not item.qc.failed and item.qc.scan_mask is not None
    size = (128, 160)
    ours = node_input(item.instance, item.qc, 0, size).float() / 255.0
    spec = InputSpec(height=size[0], width=size[1])
    served = preprocess([model_input(item, 0, Region.SCAN_REGION)], spec)[0, 0]
    assert float((ours - served).abs().max()) <= 0.5 / 255 + 1e-6
    # The crop is masked outside the sector: a bounding-box crop alone differs.
    assert item.qc.scan_region is not None
    c0, r0, c1, r1 = item.qc.scan_region
    grey = item.instance.frames[0, r0:r1, c0:c1].astype(np.float32).mean(axis=2) / 255.0
    unmasked = preprocess([grey], spec)[0, 0]
    corner = served[:8, :8]
    assert float(corner.max()) == 0.0
    assert float((unmasked - served).abs().max()) > 0.1


@needs_simulator
def test_simulated_frame_sets_follow_the_node_pipeline() -> None:
    frames = simulate_frameset(3, seed=9, input_size=(64, 80), progress=False)
    assert frames.images.shape[1:] == (64, 80) and frames.images.dtype == torch.uint8
    assert len(frames) + frames.qc_excluded == 12
    again = simulate_frameset(3, seed=9, input_size=(64, 80), progress=False)
    assert torch.equal(frames.images, again.images)
