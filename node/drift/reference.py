"""The reference a drift stream is compared with, and how it is fitted.

A reference describes, per vendor and scanner seen when it was fitted (and pooled over
them all), the distribution of every signal (:mod:`node.drift.signals`) on studies where
the model is known to work: the pack's own reference studies, stored in the pack at
training or import time, or a site baseline frozen from the node's own recent studies.

Each study then gets one number per signal, ``t``: the images' scores against the
reference (rank, surprise, rate deviation or whitened embedding shift, each capped so one
odd image cannot carry a study), summed and divided by the standard deviation of such a
sum under the reference, where images of one study are correlated (intra-study
correlation ``rho``). The alarm thresholds of the sequential test
(:mod:`node.drift.monitor`) come from statistics never computed against the distributions
they were fitted on: the studies are split in two halves, each half's ``t`` is computed
against distributions fitted on the other (cross-fitting); these held-out values
standardise ``t`` and set the thresholds by bootstrap, so that a stream without shift
alarms at the stated rate.

Written by hand: no maintained library both compares a stream with a stored reference
incrementally and sets its thresholds for a stated false-alarm rate (Evidently and
NannyML test windows against a reference window; ``bench/drift.py`` compares them).
scipy provides the distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import special

from node.drift.signals import ALLOWANCE, ImageSignals, SignalKind, SignalSpec

REFERENCE_VERSION = 1
CAP = 3.0
"""Largest score one image contributes, in its own standard deviations."""
RUN_LENGTH = 1000
"""Studies over which the false-alarm rate is stated."""
DEFAULT_FALSE_ALARMS = 0.5
"""Default target: false-alarm episodes per stream and :data:`RUN_LENGTH` studies."""
EMBEDDING_AXES = 8
"""Principal axes of the embedding that are monitored."""
MIN_STUDIES = 20
"""Fewest studies of a group (both halves together) for a signal to be monitored."""
_QUANTILES = 201
_BOOTSTRAP_RUNS = 4000
_DEGENERATE_SD = 0.25
POOLED = "*"
"""Key of the group pooled over every vendor and scanner of the reference."""


def group_key(vendor: str, scanner: str) -> str:
    """Key of the group of a normalised vendor and scanner (``"*"`` for any)."""
    return f"{vendor}|{scanner}"


# ----------------------------------------------------------------------------------------
# Per-image scores
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignalReference:
    """The reference of one signal in one group, and the thresholds of its test."""

    name: str
    kind: SignalKind
    rho: float
    """Intra-study correlation of the image scores."""
    t_mean: float
    t_sd: float
    """Mean and standard deviation of the held-out (cross-fitted) ``t`` of the reference."""
    h_up: float
    h_down: float | None
    """Alarm thresholds of the upper and lower CUSUM (``None``: one-sided)."""
    allowance: float = ALLOWANCE
    """The CUSUM allowance ``k`` its thresholds were set for."""
    quantiles: tuple[float, ...] = ()
    probabilities: Mapping[str, float] = field(default_factory=dict)
    unseen: float = 0.0
    """Probability given to a label the reference never saw."""
    surprise_mean: float = 0.0
    surprise_sd: float = 1.0
    rate: float = 0.0
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()

    # -- scores ----------------------------------------------------------------------------
    def scores(self, images: Sequence[ImageSignals]) -> np.ndarray:
        """Per-image scores of the images that have this signal: ``(n,)``, or ``(n, K)``
        for the embedding."""
        if self.kind is SignalKind.EMBEDDING:
            rows = [im.embedding for im in images if im.embedding is not None]
            rows = [r for r in rows if len(r) == len(self.mean)]
            if not rows:
                return np.zeros((0, len(self.mean)))
            v = (np.asarray(rows, float) - np.asarray(self.mean)) / np.asarray(self.sd)
            return np.clip(v, -2 * CAP, 2 * CAP)
        values = [im.values.get(self.name) for im in images]
        present = [v for v in values if v is not None]
        if self.kind is SignalKind.NUMERIC:
            x = _numbers(present)
            if x.size == 0:
                return x
            q = np.asarray(self.quantiles)
            rank = (np.searchsorted(q, x, "left") + np.searchsorted(q, x, "right")) / (2 * q.size)
            rank = np.clip(rank, 0.5 / q.size, 1 - 0.5 / q.size)
            return np.clip(special.ndtri(rank), -CAP, CAP)
        if self.kind is SignalKind.CATEGORY:
            p = np.asarray([self.probabilities.get(str(v), self.unseen) for v in present], float)
            return np.clip((-np.log(p) - self.surprise_mean) / self.surprise_sd, -CAP, CAP)
        flags = _numbers(present)
        sd = math.sqrt(self.rate * (1 - self.rate))
        return np.clip((flags - self.rate) / sd, -CAP, CAP)

    def raw_statistic(self, images: Sequence[ImageSignals]) -> float | None:
        """``t`` before standardisation; ``None`` when no image has the signal."""
        scores = self.scores(images)
        n = scores.shape[0]
        if n == 0:
            return None
        inflation = n * (1 + (n - 1) * self.rho)
        if self.kind is SignalKind.EMBEDDING:
            mean = scores.mean(axis=0)
            chi = float(n * n * np.sum(mean**2) / inflation)
            p = float(special.chdtr(scores.shape[1], chi))
            return float(np.clip(special.ndtri(min(max(p, 1e-9), 1 - 1e-9)), -6, 6))
        return float(scores.sum() / math.sqrt(inflation))

    def statistic(self, images: Sequence[ImageSignals]) -> float | None:
        """Standardised ``t`` of a study (mean 0, sd 1 on reference studies)."""
        raw = self.raw_statistic(images)
        return None if raw is None else (raw - self.t_mean) / self.t_sd

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "rho": round(self.rho, 5),
            "t_mean": round(self.t_mean, 5),
            "t_sd": round(self.t_sd, 5),
            "h_up": round(self.h_up, 4),
            "h_down": None if self.h_down is None else round(self.h_down, 4),
        }
        if self.allowance != ALLOWANCE:
            out["allowance"] = self.allowance
        if self.kind is SignalKind.NUMERIC:
            out["quantiles"] = [float(f"{v:.6g}") for v in self.quantiles]
        elif self.kind is SignalKind.CATEGORY:
            out.update(
                probabilities={k: round(v, 6) for k, v in self.probabilities.items()},
                unseen=self.unseen,
                surprise_mean=round(self.surprise_mean, 6),
                surprise_sd=round(self.surprise_sd, 6),
            )
        elif self.kind is SignalKind.RATE:
            out["rate"] = round(self.rate, 6)
        else:
            out.update(mean=[round(v, 5) for v in self.mean], sd=[round(v, 5) for v in self.sd])
        return out

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> SignalReference:
        return cls(
            name=name,
            kind=SignalKind(data["kind"]),
            rho=float(data["rho"]),
            t_mean=float(data["t_mean"]),
            t_sd=float(data["t_sd"]),
            h_up=float(data["h_up"]),
            h_down=None if data.get("h_down") is None else float(data["h_down"]),
            allowance=float(data.get("allowance", ALLOWANCE)),
            quantiles=tuple(float(v) for v in data.get("quantiles", ())),
            probabilities={str(k): float(v) for k, v in data.get("probabilities", {}).items()},
            unseen=float(data.get("unseen", 0.0)),
            surprise_mean=float(data.get("surprise_mean", 0.0)),
            surprise_sd=float(data.get("surprise_sd", 1.0)),
            rate=float(data.get("rate", 0.0)),
            mean=tuple(float(v) for v in data.get("mean", ())),
            sd=tuple(float(v) for v in data.get("sd", ())),
        )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


def _numbers(values: Sequence[object]) -> np.ndarray:
    """The finite numbers among ``values``, as a float array."""
    return np.asarray([float(v) for v in values if isinstance(v, int | float) and _finite(v)],
                      dtype=np.float64)


# ----------------------------------------------------------------------------------------
# Groups and references
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupReference:
    """The reference of one vendor and scanner (or of all pooled)."""

    vendor: str
    scanner: str
    studies: int
    images: int
    signals: Mapping[str, SignalReference]
    confidence: Mapping[str, float] = field(default_factory=dict)
    """Mean calibrated confidence of each head on the reference (its expected accuracy)."""

    def charts(self) -> int:
        """Number of one-sided tests (a two-sided signal counts twice)."""
        return sum(1 if s.h_down is None else 2 for s in self.signals.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "scanner": self.scanner,
            "studies": self.studies,
            "images": self.images,
            "confidence": {k: round(v, 5) for k, v in self.confidence.items()},
            "signals": {k: v.to_json() for k, v in self.signals.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupReference:
        return cls(
            vendor=str(data["vendor"]),
            scanner=str(data["scanner"]),
            studies=int(data["studies"]),
            images=int(data["images"]),
            confidence={str(k): float(v) for k, v in data.get("confidence", {}).items()},
            signals={
                str(k): SignalReference.from_json(str(k), v) for k, v in data["signals"].items()
            },
        )


@dataclass(frozen=True)
class Projection:
    """Principal axes of the pack's embedding (fitted on the reference studies)."""

    mean: np.ndarray
    components: np.ndarray
    """``(K, D)``: unit rows."""

    def project(self, embedding: np.ndarray) -> tuple[float, ...] | None:
        """Coordinates of one image's embedding; ``None`` when its size does not fit."""
        x = np.asarray(embedding, float).reshape(-1)
        if x.shape[0] != self.mean.shape[0]:
            return None
        return tuple(float(v) for v in self.components @ (x - self.mean))

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": [float(f"{v:.6g}") for v in self.mean],
            "components": [[float(f"{v:.6g}") for v in row] for row in self.components],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Projection:
        return cls(np.asarray(data["mean"], float), np.asarray(data["components"], float))


def fit_projection(embeddings: np.ndarray, *, axes: int = EMBEDDING_AXES) -> Projection:
    """The first ``axes`` principal axes of ``embeddings`` ``(N, D)``."""
    x = np.asarray(embeddings, float)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return Projection(mean, vt[: min(axes, vt.shape[0])])


@dataclass(frozen=True)
class Match:
    """The group a stream is compared with."""

    group: GroupReference
    note: str
    """Which group it is, in words (shown on ``/drift`` and the dashboard)."""
    fallback: bool = False
    """The stream's own vendor or scanner is not in the reference: a wider group is used."""


@dataclass(frozen=True)
class Reference:
    """A drift reference: per-group signal references, the embedding axes, provenance."""

    description: str
    groups: Mapping[str, GroupReference]
    projection: Projection | None = None
    false_alarms: float = DEFAULT_FALSE_ALARMS
    """Target false-alarm episodes per stream and :data:`RUN_LENGTH` studies."""
    site_baseline: bool = False

    def group_for(self, vendor: str, scanner: str) -> Match | None:
        """The group a stream of ``vendor`` and ``scanner`` is compared with: its own, its
        vendor's only scanner, or the pooled group; ``None`` when there is none."""
        kind = "site baseline" if self.site_baseline else "pack reference"
        exact = self.groups.get(group_key(vendor, scanner))
        if exact is not None:
            return Match(exact, f"{kind}: {exact.studies} studies of this vendor and scanner")
        same_vendor = [g for g in self.groups.values() if g.vendor == vendor]
        if len(same_vendor) == 1:
            g = same_vendor[0]
            return Match(g, f"{kind}: {g.studies} studies of this vendor's scanner {g.scanner} "
                            "(this scanner model was not in the reference)", fallback=True)
        pooled = self.groups.get(POOLED)
        if pooled is not None:
            return Match(pooled, f"{kind}: {pooled.studies} studies of all reference vendors "
                                 "pooled (this vendor was not in the reference)", fallback=True)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REFERENCE_VERSION,
            "description": self.description,
            "false_alarms_per_run": self.false_alarms,
            "run_length": RUN_LENGTH,
            "allowance": ALLOWANCE,
            "site_baseline": self.site_baseline,
            "projection": None if self.projection is None else self.projection.to_json(),
            "groups": {k: g.to_json() for k, g in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        if int(data.get("version", 0)) != REFERENCE_VERSION:
            raise ValueError(
                f"drift reference version {data.get('version')!r} is not {REFERENCE_VERSION}"
            )
        projection = data.get("projection")
        return cls(
            description=str(data.get("description", "")),
            groups={str(k): GroupReference.from_json(v) for k, v in data["groups"].items()},
            projection=None if projection is None else Projection.from_json(projection),
            false_alarms=float(data.get("false_alarms_per_run", DEFAULT_FALSE_ALARMS)),
            site_baseline=bool(data.get("site_baseline", False)),
        )


# ----------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------
Study = Sequence[ImageSignals]


def _icc(scores: Sequence[np.ndarray]) -> float:
    """One-way ANOVA intra-class correlation of per-image scores grouped by study."""
    groups = [g for g in scores if g.size > 0]
    n_total = sum(g.size for g in groups)
    if len(groups) < 3 or n_total <= len(groups):
        return 0.0
    grand = float(np.concatenate(groups).mean())
    msb = sum(g.size * (g.mean() - grand) ** 2 for g in groups) / (len(groups) - 1)
    msw = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (n_total - len(groups))
    n0 = (n_total - sum(g.size**2 for g in groups) / n_total) / (len(groups) - 1)
    denominator = msb + (n0 - 1) * msw
    if denominator <= 0:
        return 0.0
    return float(np.clip((msb - msw) / denominator, 0.0, 0.9))


def _distribution(spec: SignalSpec, images: Sequence[ImageSignals]) -> SignalReference | None:
    """The signal's reference distribution from ``images`` (``rho`` and the test's
    constants are filled in later)."""
    base = SignalReference(name=spec.name, kind=spec.kind, rho=0.0, t_mean=0.0, t_sd=1.0,
                           h_up=math.inf, h_down=math.inf)
    if spec.kind is SignalKind.EMBEDDING:
        sizes = [len(im.embedding) for im in images if im.embedding is not None]
        size = max(set(sizes), key=sizes.count) if sizes else 0
        rows = np.asarray([im.embedding for im in images
                           if im.embedding is not None and len(im.embedding) == size], float)
        if rows.shape[0] < 2 * MIN_STUDIES:
            return None
        sd = np.maximum(rows.std(axis=0), 1e-6)
        return replace(base, mean=tuple(float(v) for v in rows.mean(axis=0)),
                       sd=tuple(float(v) for v in sd), h_down=None)
    present = [im.values[spec.name] for im in images if im.values.get(spec.name) is not None]
    if len(present) < 2 * MIN_STUDIES:
        return None
    if spec.kind is SignalKind.NUMERIC:
        x = _numbers(present)
        if x.size < 2 * MIN_STUDIES:
            return None
        q = np.quantile(x, np.linspace(0, 1, _QUANTILES))
        return replace(base, quantiles=tuple(float(v) for v in q))
    if spec.kind is SignalKind.CATEGORY:
        labels = [str(v) for v in present]
        counts = {label: labels.count(label) for label in sorted(set(labels))}
        total = len(labels) + 0.5 * (len(counts) + 1)
        p = {label: (c + 0.5) / total for label, c in counts.items()}
        unseen = 0.5 / total
        surprise = np.asarray([-math.log(v) for v in p.values()])
        weights = np.asarray(list(p.values())) / sum(p.values())
        mean = float(np.sum(weights * surprise))
        sd = max(float(np.sqrt(np.sum(weights * (surprise - mean) ** 2))), 0.25)
        return replace(base, probabilities=p, unseen=unseen, surprise_mean=mean,
                       surprise_sd=sd)
    flags = _numbers(present)
    rate = (float(flags.sum()) + 0.5) / (flags.size + 1.0)
    return replace(base, rate=rate)


def cusum_maxima(values: np.ndarray, *, runs: int, length: int, rng: np.random.Generator,
                 offset_sd: float = 0.0, allowance: float = ALLOWANCE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Largest upper and lower CUSUM statistic (allowance ``allowance``) over ``length``
    studies in ``runs`` bootstrap runs drawn from the standardised ``values``. Each run is
    offset by a draw of ``N(0, offset_sd)``: the uncertainty of the mean the values were
    standardised with."""
    offsets = rng.normal(0.0, offset_sd, size=runs) if offset_sd > 0 else np.zeros(runs)
    up = np.zeros(runs)
    down = np.zeros(runs)
    max_up = np.zeros(runs)
    max_down = np.zeros(runs)
    for _ in range(length):
        x = values[rng.integers(0, values.size, size=runs)] + offsets
        up = np.maximum(0.0, up + x - allowance)
        down = np.maximum(0.0, down - x - allowance)
        np.maximum(max_up, up, out=max_up)
        np.maximum(max_down, down, out=max_down)
    return max_up, max_down


def fit_group(
    studies: Sequence[Study],
    specs: Mapping[str, SignalSpec],
    *,
    vendor: str,
    scanner: str,
    seed: int,
    false_alarms: float = DEFAULT_FALSE_ALARMS,
) -> GroupReference:
    """Fit the reference of one group from its studies (cross-fitted halves, see the module).

    Raises
    ------
    ValueError
        With fewer than :data:`MIN_STUDIES` studies.
    """
    if len(studies) < MIN_STUDIES:
        raise ValueError(f"a drift reference needs at least {MIN_STUDIES} studies, got "
                         f"{len(studies)} for {vendor} / {scanner}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(studies))
    folds = [[studies[i] for i in order[0::2]], [studies[i] for i in order[1::2]]]
    images = [im for s in studies for im in s]

    drafts: dict[str, tuple[SignalReference, np.ndarray]] = {}
    for name, spec in specs.items():
        final = _distribution(spec, images)
        if final is None:
            continue
        per_study = [final.scores(s) for s in studies]
        if spec.kind is SignalKind.EMBEDDING:
            rho = float(np.mean([_icc([p[:, j] for p in per_study if p.shape[0]])
                                 for j in range(len(final.mean))]))
        else:
            rho = _icc(per_study)
        # Cross-fitting: each half's statistics against distributions fitted on the other.
        held_out: list[float] = []
        for k in (0, 1):
            part = _distribution(spec, [im for s in folds[k] for im in s])
            if part is None:
                continue
            part = replace(part, rho=rho)
            held_out.extend(v for s in folds[1 - k] if (v := part.raw_statistic(s)) is not None)
        t = np.asarray(held_out, float)
        if t.size < MIN_STUDIES:
            continue
        drafts[name] = (replace(final, rho=rho), t)

    charts = sum(1 if d.kind is SignalKind.EMBEDDING else 2 for d, _ in drafts.values())
    alpha = min(0.5, false_alarms / max(charts, 1))
    # A signal (nearly) constant on the reference (one pixel spacing, one photometric
    # interpretation) has no spread to calibrate with: its statistic is tested as if it
    # were standard normal, so a change of all its images alarms within a few studies and
    # one odd image never does.
    gauss: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    signals: dict[str, SignalReference] = {}
    for name, (draft, t) in drafts.items():
        mean, sd = float(t.mean()), float(t.std(ddof=1))
        allowance = specs[name].allowance
        if sd < _DEGENERATE_SD:
            if allowance not in gauss:
                gauss[allowance] = cusum_maxima(rng.standard_normal(4096), runs=_BOOTSTRAP_RUNS,
                                                length=RUN_LENGTH, rng=rng, allowance=allowance)
            (max_up, max_down), mean, sd = gauss[allowance], 0.0, 1.0
        else:
            z = (t - mean) / sd
            max_up, max_down = cusum_maxima(z, runs=_BOOTSTRAP_RUNS, length=RUN_LENGTH, rng=rng,
                                            offset_sd=1.0 / math.sqrt(z.size),
                                            allowance=allowance)
        h_up = float(np.quantile(max_up, 1 - alpha))
        h_down = None if draft.kind is SignalKind.EMBEDDING else float(
            np.quantile(max_down, 1 - alpha))
        signals[name] = replace(draft, t_mean=mean, t_sd=sd, h_up=max(h_up, 1.0),
                                h_down=None if h_down is None else max(h_down, 1.0),
                                allowance=allowance)

    confidence: dict[str, float] = {}
    for name in specs:
        if name.endswith("_confidence"):
            values = _numbers([im.values.get(name) for im in images])
            if values.size:
                confidence[name.removesuffix("_confidence")] = float(values.mean())
    return GroupReference(vendor=vendor, scanner=scanner, studies=len(studies),
                          images=sum(len(s) for s in studies), signals=signals,
                          confidence=confidence)
