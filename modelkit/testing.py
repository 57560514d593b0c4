"""Helpers for tests of the node: tiny packs, stub networks, synthetic prepared instances.

Used by ``tests/test_models*.py`` and by other parts' tests that need a model pack without
training one. Nothing here is used in production code paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_sr.model import QCOutcome
from modelkit.pack_writer import write_pack
from modelkit.train import multitask_manifest
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance
from workers.models.manifest import Manifest
from workers.models.nets import CLASSIFICATION_HEADS, MultiTaskMobileNet
from workers.models.ood import MahalanobisScorer
from workers.models.packs import ModelPack


def tiny_manifest(*, n_members: int = 1, width: float = 0.25) -> dict[str, Any]:
    """A valid multi-task manifest dict for a small network, with an OOD section."""
    manifest = multitask_manifest(
        name="tiny-test-pack",
        version="0.0.1",
        width=width,
        n_members=n_members,
        simulated=True,
        training_description="untrained, for tests",
    )
    manifest["ood"] = {"method": "mahalanobis", "threshold": 1e6, "tpr": 0.95}
    manifest["tasks"]["nodule"]["operating_point"] = {
        "label": "malignant",
        "method": "youden",
        "threshold": 0.4,
        "sensitivity": 0.9,
        "specificity": 0.8,
    }
    return manifest


def write_tiny_pack(folder: Path, *, n_members: int = 1, seed: int = 0) -> Path:
    """Write an untrained width-0.25 multi-task pack (with OOD stats) to ``folder``."""
    torch.manual_seed(seed)
    nets = [MultiTaskMobileNet(width=0.25) for _ in range(n_members)]
    rng = np.random.default_rng(seed)
    ood = MahalanobisScorer.fit(rng.normal(size=(200, nets[0].embedding_dim)))
    return write_pack(
        folder, tiny_manifest(n_members=n_members), [n.state_dict() for n in nets], ood=ood
    )


class StubNet(nn.Module):
    """Network whose logits are fixed per task, or chosen by the input's mean grey level.

    ``logits[task]`` is a ``(K,)`` vector used for every frame, or a callable of the batch
    mean intensities ``(N,)`` returning ``(N, K)``.
    """

    def __init__(self, logits: Mapping[str, Any], *, quality: float = 0.7, dim: int = 8) -> None:
        super().__init__()
        self.logits = dict(logits)
        self.quality = quality
        self.dim = dim
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        mean = x.mean(dim=(1, 2, 3))
        out: dict[str, torch.Tensor] = {
            "embedding": mean[:, None].expand(n, self.dim).contiguous(),
            "quality": torch.full((n,), self.quality),
        }
        for task, value in self.logits.items():
            if callable(value):
                out[task] = torch.as_tensor(value(mean), dtype=torch.float32)
            else:
                out[task] = torch.as_tensor(value, dtype=torch.float32)[None].expand(n, -1)
        return out


def stub_pack(
    logits: Mapping[str, Any],
    *,
    manifest: dict[str, Any] | None = None,
    ood_threshold: float | None = None,
    ood_center: float = 0.0,
) -> ModelPack:
    """An in-memory pack around a :class:`StubNet` (CPU)."""
    document = manifest or tiny_manifest()
    document = {**document, "members": [{"weights": "w.pt", "sha256": "0" * 64}]}
    ood = None
    if ood_threshold is not None:
        document["ood"] = {
            "method": "mahalanobis",
            "stats": "o.npz",
            "sha256": "0" * 64,
            "threshold": ood_threshold,
            "tpr": 0.95,
        }
        ood = MahalanobisScorer(np.full(8, ood_center), np.eye(8))
    else:
        document["ood"] = None
    full = {t: logits.get(t, np.zeros(len(labels))) for t, labels in CLASSIFICATION_HEADS.items()}
    full.update({k: v for k, v in logits.items() if k not in full})
    return ModelPack(Manifest.from_dict(document), [StubNet(full)], ood=ood, device="cpu")


def prepared_instance(
    *,
    frames: int = 1,
    size: tuple[int, int] = (120, 160),
    grey: int | None = None,
    outcome: QCOutcome = QCOutcome.PASS,
    usable: Sequence[int] | None = None,
    scan_region: tuple[int, int, int, int] | None = (10, 10, 150, 110),
    uid: str = "1.2.826.0.1.3680043.8.498.1",
    seed: int = 0,
) -> PreparedInstance:
    """A synthetic RGB ultrasound instance with its QC outcome."""
    rng = np.random.default_rng(seed)
    if grey is None:
        pixels = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    else:
        pixels = np.full((frames, *size, 3), grey, dtype=np.uint8)
    instance = DecodedInstance.from_pixels(pixels, sop_instance_uid=uid, manufacturer="Test")
    usable_frames = tuple(range(frames)) if usable is None else tuple(usable)
    if outcome is QCOutcome.FAIL:
        usable_frames = ()
    qc = InstanceQC(
        outcome=outcome, checks=(), usable_frames=usable_frames, scan_region=scan_region
    )
    return PreparedInstance(instance, qc)
