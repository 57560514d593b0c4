"""Out-of-distribution scorers of model packs: higher score = less familiar input.

:class:`MahalanobisScorer` (distance of the pooled embedding to the training embeddings,
with statistics stored in the pack) and :class:`EnergyScorer` (energy of a classification
task's logits, needing no statistics). Written by hand: each is a few lines of numpy, and
the libraries that offer them (pytorch-ood, alibi-detect) would bring their own model
wrappers or a licence a hospital cannot use in production.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from workers.models.manifest import OODMethod, OODSpec, PackFormatError, TaskKind, TaskSpec


def shrunk_gaussian(x: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of rows ``x``, the covariance shrunk towards its diagonal scale
    by a fixed ``shrinkage`` (Ledoit-Wolf style)."""
    cov = np.cov(x, rowvar=False)
    target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    return x.mean(axis=0), np.linalg.pinv((1 - shrinkage) * cov + shrinkage * target)


class MahalanobisScorer:
    """Mahalanobis distance of an embedding to the training distribution
    (:attr:`OODMethod.MAHALANOBIS`)."""

    method = OODMethod.MAHALANOBIS

    def __init__(self, mean: np.ndarray, precision: np.ndarray) -> None:
        if mean.ndim != 1 or precision.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"OOD stats: mean (D,) and precision (D, D) expected, got {mean.shape} and "
                f"{precision.shape}"
            )
        self.mean = mean.astype(np.float64)
        self.precision = precision.astype(np.float64)

    @classmethod
    def fit(cls, embeddings: np.ndarray, *, shrinkage: float = 0.1) -> MahalanobisScorer:
        """Fit mean and shrunk covariance (Ledoit-Wolf style, fixed ``shrinkage``)."""
        return cls(*shrunk_gaussian(np.asarray(embeddings, np.float64), shrinkage))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        d = np.asarray(embeddings, np.float64) - self.mean
        squared: np.ndarray = np.einsum("nd,de,ne->n", d, self.precision, d)
        return np.sqrt(np.maximum(squared, 0.0))

    def score_outputs(self, raw: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Distances of the first member's ``embedding`` output, ``(N,)``."""
        if "embedding" not in raw[0]:
            raise PackFormatError(
                f"Mahalanobis OOD needs an 'embedding' output (outputs: {sorted(raw[0])})"
            )
        embedding = raw[0]["embedding"]
        return self.score(embedding.reshape(embedding.shape[0], -1))

    def save(self, path: Path) -> None:
        np.savez(
            path, mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32)
        )

    @classmethod
    def load(cls, path: Path) -> MahalanobisScorer:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["precision"])


class EnergyScorer:
    """Energy of a classification task's raw logits (:attr:`OODMethod.ENERGY`).

    ``E(x) = -T * logsumexp(logits / T)``, averaged over ensemble members: low (very negative)
    when one class is strongly supported, higher for unfamiliar inputs (Liu et al., "Energy-based
    Out-of-distribution Detection", NeurIPS 2020). It needs no statistics of the training
    data, only a threshold set on in-distribution frames.

    Parameters
    ----------
    task
        Name of the classification task whose logits are scored.
    output
        Key of that task's logits in the network's output dict.
    temperature
        Energy temperature ``T`` (1.0 in the paper); not the calibration temperature.
    """

    method = OODMethod.ENERGY

    def __init__(self, *, task: str, output: str, temperature: float = 1.0) -> None:
        if not task or not output:
            raise ValueError("EnergyScorer needs a task and an output name")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"energy temperature must be positive, got {temperature!r}")
        self.task = task
        self.output = output
        self.temperature = float(temperature)

    @classmethod
    def for_task(cls, task: TaskSpec, *, temperature: float = 1.0) -> EnergyScorer:
        if task.kind is not TaskKind.CLASSIFICATION:
            raise ValueError(f"energy needs a classification task, {task.name!r} is {task.kind}")
        return cls(task=task.name, output=task.output, temperature=temperature)

    def score_logits(self, logits: np.ndarray) -> np.ndarray:
        """Energies ``(N,)`` of ``(N, K)`` logits."""
        z = np.asarray(logits, np.float64) / self.temperature
        if z.ndim != 2 or z.shape[1] < 2:
            raise ValueError(f"energy needs (N, K >= 2) logits, got shape {z.shape}")
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        energies: np.ndarray = -self.temperature * lse
        return energies

    def score_outputs(self, raw: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Mean energy over ensemble members, ``(N,)``."""
        for member in raw:
            if self.output not in member:
                raise PackFormatError(
                    f"energy OOD of task {self.task!r} needs output {self.output!r} "
                    f"(outputs: {sorted(member)})"
                )
        energies: np.ndarray = np.mean([self.score_logits(m[self.output]) for m in raw], axis=0)
        return energies


#: The out-of-distribution scorers a pack can carry (see :class:`OODMethod`).
OODDetector = MahalanobisScorer | EnergyScorer


def ood_detector(spec: OODSpec, tasks: Mapping[str, TaskSpec], folder: Path | None) -> OODDetector:
    """Build the scorer ``spec`` describes; Mahalanobis statistics are read from ``folder``.

    Raises
    ------
    PackFormatError
        If the statistics cannot be read or the energy task is not a classification task.
    """
    if spec.method is OODMethod.ENERGY:
        assert spec.task is not None
        try:
            return EnergyScorer.for_task(tasks[spec.task], temperature=spec.temperature)
        except (KeyError, ValueError) as exc:
            raise PackFormatError(f"model pack {folder}: invalid energy OOD: {exc}") from exc
    if folder is None or spec.stats is None:
        raise PackFormatError("Mahalanobis OOD needs its statistics file")
    try:
        return MahalanobisScorer.load(folder / spec.stats)
    except (OSError, ValueError, KeyError) as exc:
        raise PackFormatError(f"model pack {folder}: invalid OOD stats: {exc}") from exc
