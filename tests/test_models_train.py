"""Training: the loss goes down, augmentation keeps the frame, splits are by study."""

from __future__ import annotations

import numpy as np
import torch

from workers.models.data import FrameSet, split_by_study
from workers.models.nets import MultiTaskMobileNet, count_parameters
from workers.models.packs import InputSpec
from workers.models.train import augment, multitask_loss, train_network

SPEC = InputSpec(height=48, width=64, mean=0.3, std=0.25)


def toy_frames(n: int = 192, seed: int = 0) -> FrameSet:
    """View k is a bright band at row position k; nodule on 'thyroid' bands by band width."""
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 5, n)
    images = rng.integers(0, 60, (n, 48, 64)).astype(np.uint8)
    for i, v in enumerate(view):
        images[i, 4 + 8 * v : 10 + 8 * v, :] = 220
    nodule = np.where(np.isin(view, [1, 2]), rng.integers(0, 3, n), -1)
    for i in np.nonzero(nodule >= 0)[0]:
        images[i, 30:40, 8 : 8 + 16 * (nodule[i] + 1)] = 255
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
