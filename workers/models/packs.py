"""Loaded model packs: the networks a manifest names, verified, on a device, predicting.

:meth:`ModelPack.load` reads the manifest (:func:`workers.models.manifest.read_manifest`),
verifies the sha256 of every file it names and builds the network by architecture name
(:func:`workers.models.nets.build_network`); any failure raises a typed
:class:`~workers.models.manifest.PackError` naming the pack and the offending field or file.
:meth:`ModelPack.predict` turns frames into calibrated per-task probabilities, regression
values, the pooled embedding and an out-of-distribution score, in batches, under
``torch.inference_mode``, with mixed precision on CUDA.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_sr.model import AlgorithmInfo
from node.drift.reference import Reference
from workers.models.image_statistics import ImageStatisticsScorer
from workers.models.manifest import (
    InputSpec,
    Manifest,
    OODMethod,
    PackFormatError,
    TaskKind,
    TaskRole,
    TaskSpec,
    read_manifest,
    verify_files,
)
from workers.models.nets import build_network
from workers.models.ood import OODDetector, ood_detector
from workers.models.preprocess import preprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Per-frame outputs of a pack for ``N`` frames.

    ``probabilities[task]`` is ``(N, K)`` calibrated (temperature-scaled, ensemble-averaged)
    class probabilities in the label order of the manifest; ``values[task]`` is ``(N,)`` for
    regression tasks; ``embedding`` is ``(N, D)`` (first member); ``ood_score`` ``(N,)`` the
    pack's out-of-distribution scores (Mahalanobis distance or energy, higher = less
    familiar), ``None`` when the pack has no OOD detector; ``maps`` holds the spatial outputs
    named by the manifest's ``localisation`` block (first member), e.g. class maps.
    """

    probabilities: Mapping[str, np.ndarray]
    values: Mapping[str, np.ndarray]
    embedding: np.ndarray
    ood_score: np.ndarray | None
    maps: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embedding.shape[0])


def _drift_reference(folder: Path, manifest: Manifest) -> Reference | None:
    if manifest.drift is None:
        return None
    try:
        data = json.loads((folder / manifest.drift.reference).read_text())
        return Reference.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackFormatError(
            f"model pack {folder}: drift reference {manifest.drift.reference} is invalid: {exc}"
        ) from exc


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given.

    Raises
    ------
    ValueError
        If the device string is invalid or names CUDA on a machine without it.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"invalid torch device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


class ModelPack:
    """A loaded model pack: manifest, networks (one per ensemble member) and OOD scorer.

    Use :meth:`load`; the constructor takes already-built parts (training, tests).
    """

    def __init__(
        self,
        manifest: Manifest,
        networks: Sequence[nn.Module],
        *,
        path: Path | None = None,
        ood: OODDetector | None = None,
        device: str | torch.device = "auto",
        sha256: str = "0" * 64,
        drift: Reference | None = None,
        image_ood: ImageStatisticsScorer | None = None,
    ) -> None:
        if len(networks) != len(manifest.members):
            raise ValueError(
                f"{len(networks)} networks for {len(manifest.members)} manifest members"
            )
        spec = manifest.ood
        if ood is None and spec is not None and spec.method is OODMethod.ENERGY:
            ood = ood_detector(spec, manifest.tasks, path)  # no file: built from the manifest
        if ood is not None and spec is not None and ood.method is not spec.method:
            raise ValueError(
                f"OOD scorer {ood.method.value!r} does not match the manifest's "
                f"{spec.method.value!r}"
            )
        self.manifest = manifest
        self.path = path
        self.device = resolve_device(device)
        self.networks = [net.to(self.device).eval() for net in networks]
        self.ood = ood
        self.sha256 = sha256
        self.drift = drift
        """The drift reference stored in the pack (``None``: the node collects a site
        baseline for it)."""
        if (image_ood is None) != (spec is None or spec.image is None):
            raise ValueError("an image-statistics scorer goes with the manifest's ood.image, "
                             "and only with it")
        self.image_ood = image_ood
        """Scorer of the image statistics (``manifest.ood.image``), if the pack has one."""

    def image_ood_scores(self, crops: Sequence[np.ndarray],
                         views: Sequence[str] | None = None) -> np.ndarray | None:
        """Image-statistics distances ``(N,)`` of grey crops as the node makes them (before
        resizing), each to the training frames of its predicted view (``views``, from
        :meth:`predicted_views`), or ``None`` when the pack has no such scorer."""
        if self.image_ood is None or not crops:
            return None
        return self.image_ood.score_crops(list(crops), None if views is None else list(views))

    def predicted_views(self, probabilities: Mapping[str, np.ndarray]) -> list[str] | None:
        """The most probable view label of each frame (``None``: the pack has no view)."""
        task = self.view_task
        if task is None or task.name not in probabilities:
            return None
        return [task.label_names[int(i)] for i in probabilities[task.name].argmax(axis=1)]

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto") -> ModelPack:
        """Load and verify the pack in folder ``path``.

        Raises
        ------
        PackFormatError
            Missing or invalid ``manifest.json``, unsupported format version, unknown
            architecture, weights that do not fit the architecture.
        PackIntegrityError
            A weights or statistics file is missing or its sha256 differs from the manifest.
        """
        folder = Path(path)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        resolved = resolve_device(device)
        networks = []
        for member in manifest.members:
            try:
                net = build_network(manifest.architecture, manifest.architecture_params)
            except ValueError as exc:
                raise PackFormatError(f"model pack {folder}: {exc}") from exc
            try:
                state = torch.load(folder / member.weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
                # pickle.UnpicklingError is a subclass of Exception only; catch it by name.
                raise PackFormatError(
                    f"model pack {folder}: weights {member.weights} do not fit architecture "
                    f"{manifest.architecture} {dict(manifest.architecture_params)}: {exc}"
                ) from exc
            except Exception as exc:
                if type(exc).__name__ == "UnpicklingError":
                    raise PackFormatError(
                        f"model pack {folder}: weights {member.weights} are not a plain state "
                        f"dict (weights_only load refused): {exc}"
                    ) from exc
                raise
            networks.append(net)
        ood = (
            ood_detector(manifest.ood, manifest.tasks, folder)
            if manifest.ood is not None
            else None
        )
        image_ood = None
        if manifest.ood is not None and manifest.ood.image is not None:
            try:
                image_ood = ImageStatisticsScorer.load(folder / manifest.ood.image.stats)
            except (OSError, ValueError, KeyError) as exc:
                raise PackFormatError(
                    f"model pack {folder}: invalid image statistics: {exc}") from exc
        pack = cls(
            manifest,
            networks,
            path=folder,
            ood=ood,
            image_ood=image_ood,
            device=resolved,
            sha256=manifest.sha256,
            drift=_drift_reference(folder, manifest),
        )
        logger.info(
            "loaded model pack %s %s (%d member(s), %s) from %s on %s",
            manifest.name,
            manifest.version,
            len(networks),
            manifest.architecture,
            folder,
            pack.device,
        )
        return pack

    # -- identity ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        return self.manifest.tasks

    @property
    def input(self) -> InputSpec:
        return self.manifest.input

    @property
    def view_task(self) -> TaskSpec | None:
        """The task with role ``view``, if any."""
        for task in self.tasks.values():
            if task.role is TaskRole.VIEW:
                return task
        return None

    @property
    def algorithm(self) -> AlgorithmInfo:
        """Provenance for the SR: name, version, manifest sha256 and whether the training
        data were simulated (the SR builder then adds the disclaimer to the name, once)."""
        return AlgorithmInfo(
            name=self.manifest.name,
            version=self.manifest.version,
            sha256=self.sha256,
            simulated_training_data=self.manifest.simulated,
        )

    # -- inference ---------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    def raw_outputs(
        self, frames: Sequence[np.ndarray] | torch.Tensor, *, batch_size: int = 32
    ) -> list[dict[str, np.ndarray]]:
        """Uncalibrated network outputs per member (logits, regression values, embedding).

        ``frames`` are grey frames (see :func:`to_unit_grey`) or an already pre-processed
        ``(N, C, H, W)`` tensor.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(frames)
        per_member: list[dict[str, list[np.ndarray]]] = [{} for _ in self.networks]
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = frames[start : start + batch_size]
                batch = chunk if isinstance(chunk, torch.Tensor) else preprocess(chunk, self.input)
                batch = batch.to(self.device, non_blocking=True)
                with self._autocast():
                    for store, net in zip(per_member, self.networks, strict=True):
                        for key, value in net(batch).items():
                            if isinstance(value, torch.Tensor):
                                store.setdefault(key, []).append(value.float().cpu().numpy())
        return [
            {key: np.concatenate(parts) for key, parts in store.items()} for store in per_member
        ]

    def calibrate_outputs(self, raw: Sequence[Mapping[str, np.ndarray]]) -> Prediction:
        """Temperature-scale, ensemble-average and score raw member outputs."""
        probabilities: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        for task in self.tasks.values():
            for member in raw:
                if task.output not in member:
                    raise PackFormatError(
                        f"model pack {self.name}: network has no output {task.output!r} "
                        f"for task {task.name!r} (outputs: {sorted(member)})"
                    )
            if task.kind is TaskKind.CLASSIFICATION:
                probs = [
                    softmax(member[task.output] / temperature)
                    for member, temperature in zip(raw, task.temperatures, strict=True)
                ]
                stacked = np.mean(probs, axis=0)
                if stacked.shape[-1] != len(task.labels):
                    raise PackFormatError(
                        f"model pack {self.name}: task {task.name!r} has {len(task.labels)} "
                        f"labels but the network gives {stacked.shape[-1]} outputs"
                    )
                probabilities[task.name] = stacked.astype(np.float32)
            else:
                values[task.name] = np.mean(
                    [member[task.output].reshape(-1) for member in raw], axis=0
                ).astype(np.float32)
        embedding = raw[0].get("embedding")
        if embedding is None:
            n = len(next(iter(probabilities.values()), np.zeros(0)))
            embedding = np.zeros((n, 0), np.float32)
        embedding = embedding.reshape(embedding.shape[0], -1)
        ood = self.ood.score_outputs(raw).astype(np.float32) if self.ood is not None else None
        maps: dict[str, np.ndarray] = {}
        loc = self.manifest.localisation
        if loc is not None:
            value = raw[0].get(loc.output)
            k = len(self.tasks[loc.task].labels)
            if value is None or value.ndim != 4 or value.shape[1] != k:
                raise PackFormatError(
                    f"model pack {self.name}: localisation output {loc.output!r} must be "
                    f"(N, {k}, h, w), got {None if value is None else value.shape}"
                )
            maps[loc.output] = value.astype(np.float32)
        return Prediction(probabilities, values, embedding.astype(np.float32), ood, maps)

    def predict(
        self, frames: Sequence[np.ndarray] | torch.Tensor, *, batch_size: int = 32
    ) -> Prediction:
        """Calibrated per-frame predictions for grey ``frames`` (any size; resized).

        Frames are processed ``batch_size`` at a time under ``torch.inference_mode``; on
        CUDA with float16 autocast, on CPU in float32.
        """
        return self.calibrate_outputs(self.raw_outputs(frames, batch_size=batch_size))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probabilities


# ----------------------------------------------------------------------------------------
# Writing
