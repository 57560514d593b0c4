"""Calibration and operating points: temperature scaling, ECE, ROC, Youden's index, and
study-level bootstrap intervals.

Pure numpy/torch functions over arrays of logits, probabilities, scores and labels; no
I/O. Fit on a held-out split (never the training frames), report on another.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _check_labels(labels: np.ndarray, n: int, *, classes: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a vector of {n} entries, got shape {y.shape}")
    if n == 0:
        raise ValueError("no samples")
    if not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must be within [0, {classes - 1}], got [{y.min()}, {y.max()}]")
    return y


def mean_nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of the true labels under ``(N, K)`` probabilities (clipped at 1e-12): for an
    ensemble, the averaged calibrated probabilities have no single logit to start from."""
    p = np.asarray(probabilities, np.float64)
    y = _check_labels(labels, p.shape[0], classes=p.shape[1])
    return float(frame_nll(p, y).mean())


def frame_nll(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-frame NLL of the true labels (clipped at 1e-12): the mean of any subset is that
    subset's :func:`mean_nll`, so a bootstrap takes means instead of recomputing."""
    p = np.asarray(probabilities, np.float64)
    y = _check_labels(labels, p.shape[0], classes=p.shape[1])
    return np.asarray(-np.log(np.clip(p[np.arange(y.size), y], 1e-12, 1.0)))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    max_iter: int = 200,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (LBFGS on ``log T``).

    Parameters
    ----------
    logits
        ``(N, K)`` uncalibrated logits of a held-out split.
    labels
        ``(N,)`` true class indices.

    Raises
    ------
    ValueError
        If shapes disagree or labels are out of range.
    """
    z = torch.as_tensor(np.asarray(logits, np.float64))
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (N, K>=2), got shape {tuple(z.shape)}")
    y = torch.as_tensor(_check_labels(labels, z.shape[0], classes=z.shape[1]))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    temperature = float(log_t.exp().item())
    if not math.isfinite(temperature):
        logger.warning("temperature fit diverged; using 1.0")
        return 1.0
    return float(min(max(temperature, bounds[0]), bounds[1]))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin confidence, accuracy and count of a reliability diagram."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, *, n_bins: int = 15
) -> ReliabilityBins:
    """Top-label confidence vs accuracy in ``n_bins`` equal-width bins (empty bins: NaN)."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (N, K), got shape {p.shape}")
    y = _check_labels(labels, p.shape[0], classes=p.shape[1])
    return _bins(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), n_bins)


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.asarray(np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1))


def _bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int,
          index: np.ndarray | None = None) -> ReliabilityBins:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if index is None:
        index = _bin_index(confidence, n_bins)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, confidence, n_bins) / count
        acc = np.bincount(index, correct, n_bins) / count
    return ReliabilityBins(edges, conf, acc, count)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, *, n_bins: int = 15
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over ``n_bins`` equal-width bins."""
    return _ece(reliability_bins(probabilities, labels, n_bins=n_bins))


@dataclass(frozen=True)
class BinnedConfidence:
    """Per-frame top-label confidence, correctness and reliability bin: the parts of the
    ECE, computed once, so that the ECE of any subset of the frames (a bootstrap resample)
    is three bincounts. ``ece(i)`` equals ``expected_calibration_error(p[i], y[i])``."""

    confidence: np.ndarray
    correct: np.ndarray
    index: np.ndarray
    n_bins: int

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray, *,
           n_bins: int = 15) -> BinnedConfidence:
        p = np.asarray(probabilities, np.float64)
        if p.ndim != 2:
            raise ValueError(f"probabilities must be (N, K), got shape {p.shape}")
        y = _check_labels(labels, p.shape[0], classes=p.shape[1])
        confidence = p.max(axis=1)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        return cls(confidence, correct, _bin_index(confidence, n_bins), n_bins)

    def ece(self, subset: np.ndarray | None = None) -> float:
        if subset is None:
            return _ece(_bins(self.confidence, self.correct, self.n_bins, self.index))
        if len(subset) == 0:
            raise ValueError("no samples")
        return _ece(_bins(self.confidence[subset], self.correct[subset], self.n_bins,
                          self.index[subset]))


def _ece(bins: ReliabilityBins) -> float:
    mask = bins.count > 0
    weights = bins.count[mask] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[mask] - bins.confidence[mask])))


def ece_noise_floor(probabilities: np.ndarray, *, n_bins: int = 15, draws: int = 200,
                    quantile: float = 0.95, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would show on these frames by chance.

    Each frame is made correct with the probability of its top-label confidence (a model
    calibrated by construction), ``draws`` times; the ``quantile`` of those ECEs is what
    sampling alone gives with this many frames and these confidences. A measured ECE below
    it is no evidence of miscalibration (a binned ECE of 30 frames is mostly noise).
    Written by hand: the calibration libraries report ECE, not its null distribution.
    """
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be (N, K) with N > 0, got shape {p.shape}")
    confidence = p.max(axis=1)
    rng = np.random.default_rng(seed)
    simulated = rng.random((draws, confidence.size)) < confidence
    eces = [_ece(_bins(confidence, row.astype(np.float64), n_bins)) for row in simulated]
    return float(np.quantile(eces, quantile))


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve of selective prediction (lower is better).

    Frames are kept from the most to the least confident; at each coverage the risk is the
    error rate among the frames kept, and AURC is its mean over all coverages (Geifman and
    El-Yaniv, "Selective classification for deep neural networks", NeurIPS 2017). A perfect
    ranking of errors last gives about ``e**2 / 2`` for an error rate ``e``; a confidence
    that knows nothing, about ``e``. Ties are taken in the given order.
    """
    c = np.asarray(confidence, np.float64).reshape(-1)
    ok = np.asarray(correct, bool).reshape(-1)
    if c.size == 0 or c.size != ok.size:
        raise ValueError("confidence and correct must be non-empty and of one length")
    order = np.argsort(-c, kind="mergesort")
    errors = np.cumsum(~ok[order])
    return float(np.mean(errors / np.arange(1, c.size + 1)))


def _binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = _check_labels(np.asarray(labels).reshape(-1), s.shape[0], classes=2)
    if y.min() == y.max():
        raise ValueError("ROC needs both positive and negative samples")
    return s, y


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``; a sample is positive when ``score >= threshold``.

    The first point is ``(0, 0)`` at threshold ``+inf``; tied scores form one point.
    """
    s, y = _binary(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (y.size - y.sum())]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; equals the Mann-Whitney U statistic with ties 1/2)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def multiclass_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present with both outcomes."""
    p = np.asarray(probabilities)
    y = _check_labels(labels, p.shape[0], classes=p.shape[1])
    aucs = [
        roc_auc(p[:, k], (y == k).astype(np.int64))
        for k in range(p.shape[1])
        if 0 < int((y == k).sum()) < y.size
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass(frozen=True)
class OperatingPointResult:
    """A threshold on a score and its sensitivity/specificity on the data it was chosen on."""

    threshold: float
    sensitivity: float
    specificity: float
    method: str

    @property
    def youden_j(self) -> float:
        return self.sensitivity + self.specificity - 1.0


def _finite_threshold(thresholds: np.ndarray, i: int) -> float:
    # Index 0 is +inf (nothing positive); clamp into [0, 1] for probability scores.
    value = thresholds[i] if math.isfinite(thresholds[i]) else thresholds[1] + 1e-6
    return float(value)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> OperatingPointResult:
    """Threshold maximising Youden's ``J = sensitivity + specificity - 1`` (first maximum,
    i.e. the highest such threshold)."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    j = tpr - fpr
    i = int(np.argmax(j))
    return OperatingPointResult(
        _finite_threshold(thresholds, i), float(tpr[i]), float(1 - fpr[i]), "youden"
    )


def threshold_for_sensitivity(
    scores: np.ndarray, labels: np.ndarray, target: float
) -> OperatingPointResult:
    """Highest threshold whose sensitivity is at least ``target`` (best specificity then)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be within (0, 1], got {target}")
    fpr, tpr, thresholds = roc_curve(scores, labels)
    i = int(np.argmax(tpr >= target - 1e-12))
    return OperatingPointResult(
        _finite_threshold(thresholds, i),
        float(tpr[i]),
        float(1 - fpr[i]),
        f"sensitivity>={target:g}",
    )


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """``(classes, classes)`` counts, rows = truth, columns = prediction."""
    y = _check_labels(labels, len(predicted), classes=classes)
    return np.bincount(y * classes + np.asarray(predicted, np.int64), minlength=classes**2).reshape(
        classes, classes
    )


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval and the number of resamples it rests on."""

    low: float
    high: float
    resamples: int

    def as_list(self, digits: int = 4) -> list[float]:
        return [round(self.low, digits), round(self.high, digits)]


def cluster_bootstrap(
    groups: np.ndarray,
    statistics: Mapping[str, Callable[[np.ndarray], float]],
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile intervals of ``statistics`` by resampling whole groups (studies).

    Frames of one study share a patient, a probe and often a nodule, so they are not
    independent: resampling frames would give intervals that are too narrow. Each resample
    draws as many groups as there are, with replacement, and evaluates every statistic on the
    frame indices of the drawn groups. A statistic that is undefined on a resample (NaN, or a
    ``ValueError`` such as an ROC without positives) skips it; a statistic defined on fewer
    than half the resamples gets no interval. scipy.stats.bootstrap resamples observations,
    not clusters, hence this small function.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be within (0, 1), got {level}")
    if resamples < 10:
        raise ValueError(f"need at least 10 resamples, got {resamples}")
    g = np.asarray(groups).reshape(-1)
    if g.size == 0:
        return {}
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in statistics}
    for _ in range(resamples):
        drawn = rng.integers(0, len(members), size=len(members))
        index = np.concatenate([members[i] for i in drawn])
        for name, statistic in statistics.items():
            try:
                value = float(statistic(index))
            except ValueError:
                continue
            if math.isfinite(value):
                values[name].append(value)
    alpha = (1.0 - level) / 2.0
    out: dict[str, Interval] = {}
    for name, got in values.items():
        if len(got) >= resamples / 2:
            low, high = np.quantile(np.asarray(got), [alpha, 1.0 - alpha])
            out[name] = Interval(float(low), float(high), len(got))
    return out
