"""What drift monitoring watches: the signals of one image, and of one study.

A worker turns each analysed study into :class:`StudySignals`, one per drift stream
(vendor, scanner, model pack): per image the input statistics QC measured, the pack's
outputs (label and confidence of each classification head, OOD score, its embedding
projected on the reference's principal axes) and three flags (QC failed, out of
distribution, needs review). The signals are plain numbers and labels: no pixels, no
patient data, so they can be stored (the site baseline is fitted from them) and shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SignalKind(StrEnum):
    """How a signal's per-image values are compared with the reference."""

    NUMERIC = "numeric"
    """A number: its rank in the reference distribution (probability integral transform)."""
    CATEGORY = "category"
    """A label: how surprising it is under the reference's label frequencies."""
    RATE = "rate"
    """A flag (0 or 1): its deviation from the reference rate."""
    EMBEDDING = "embedding"
    """A vector: the shift of its mean, whitened by the reference (one-sided)."""


#: CUSUM allowance ``k`` of a signal's charts, in standard deviations of its study
#: statistic: tuned to shifts of one.
ALLOWANCE = 0.5
#: The allowance of the slow charts: tuned to persistent shifts of about 0.6 standard
#: deviations per study (a doubled prevalence), which charts with :data:`ALLOWANCE` see
#: later and less surely (median 80 against 56 studies in one trial, ``docs/DRIFT.md``).
SLOW_ALLOWANCE = 0.3


@dataclass(frozen=True)
class SignalSpec:
    """One monitored signal."""

    name: str
    kind: SignalKind
    description: str
    allowance: float = ALLOWANCE
    """CUSUM allowance of its charts."""


#: Input statistics and rates every stream has; the per-head signals are added by
#: :func:`head_signals`, from the tasks of the pack.
INPUT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("intensity_mean", SignalKind.NUMERIC, "Mean grey level of the scan region"),
    SignalSpec("intensity_contrast", SignalKind.NUMERIC, "Grey-level spread of the scan region"),
    SignalSpec("region_fraction", SignalKind.NUMERIC, "Share of the frame the scan region covers"),
    SignalSpec("speckle_grain", SignalKind.NUMERIC,
               "Speckle grain of the scan region (neighbour-pixel correlation of its fine "
               "texture: higher with a coarser probe or a blurring preset)"),
    SignalSpec("pixel_spacing", SignalKind.NUMERIC, "Pixel size (mm) from the header"),
    SignalSpec("frames", SignalKind.NUMERIC, "Frames per instance (stills and loops)"),
    SignalSpec("photometric", SignalKind.CATEGORY, "Photometric interpretation mix"),
    SignalSpec("qc_fail_rate", SignalKind.RATE, "Share of images QC did not let through"),
)
OUTPUT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("ood_score", SignalKind.NUMERIC, "Out-of-distribution score of the pack"),
    SignalSpec("ood_rate", SignalKind.RATE, "Share of analysed images flagged out of distribution"),
    SignalSpec("review_rate", SignalKind.RATE, "Share of analysed images that need review"),
    SignalSpec("embedding", SignalKind.EMBEDDING, "Mean of the pack's image embedding"),
)


#: Suffixes of the per-head signals, in :func:`head_signals`' order.
HEAD_SUFFIXES = ("_mix", "_confidence", "_severe")


def head_signals(heads: Sequence[str]) -> tuple[SignalSpec, ...]:
    """The prediction mix, confidence and severe-probability signals of classification
    heads ``heads``.

    ``<head>_severe``, measured only for finding heads with one most severe label, is the
    calibrated probability of that label, tested as a rate: its mean is the share of
    images with the finding to expect, and a linear score of it is the locally most
    powerful test of a change of the finding's prevalence (a label shift). Its charts are
    slow (:data:`SLOW_ALLOWANCE`): twice the malignant nodules move its study statistic
    by about 0.5 to 0.6 standard deviations (``docs/DRIFT.md``).
    """
    out: list[SignalSpec] = []
    for head in heads:
        title = head.replace("_", " ")
        out.append(SignalSpec(f"{head}_mix", SignalKind.CATEGORY, f"Predicted {title} mix"))
        out.append(SignalSpec(f"{head}_confidence", SignalKind.NUMERIC,
                              f"Calibrated probability of the predicted {title}"))
        out.append(SignalSpec(f"{head}_severe", SignalKind.RATE,
                              f"Expected share of the most severe {title} (mean calibrated "
                              "probability)", allowance=SLOW_ALLOWANCE))
    return tuple(out)


def catalogue(heads: Sequence[str]) -> dict[str, SignalSpec]:
    """Every signal of a stream whose pack has classification heads ``heads``, by name."""
    return {s.name: s for s in (*INPUT_SIGNALS, *head_signals(heads), *OUTPUT_SIGNALS)}


@dataclass(frozen=True)
class ImageSignals:
    """The monitored values of one image (``None``: not measured for this image)."""

    values: Mapping[str, float | str | None]
    embedding: tuple[float, ...] | None = None
    """The pack's embedding projected on the reference's principal axes."""

    def to_json(self) -> dict[str, Any]:
        """Compact JSON form (what the observation rows store)."""
        out: dict[str, Any] = {
            k: (round(v, 6) if isinstance(v, float) else v)
            for k, v in self.values.items()
            if v is not None
        }
        if self.embedding is not None:
            out["_embedding"] = [round(v, 4) for v in self.embedding]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageSignals:
        """The signals :meth:`to_json` wrote."""
        embedding = data.get("_embedding")
        values = {k: v for k, v in data.items() if k != "_embedding"}
        return cls(values, tuple(float(v) for v in embedding) if embedding else None)


@dataclass(frozen=True)
class StudySignals:
    """The images of one study that belong to one stream (vendor, scanner, model pack)."""

    manufacturer: str
    model_name: str
    model: str
    """The pack, ``"name version"``."""
    heads: tuple[str, ...]
    """The pack's classification heads (the per-head signals of the stream)."""
    images: tuple[ImageSignals, ...] = field(default_factory=tuple)


def describe(name: str) -> str:
    """The description of signal ``name`` (a per-head one from its name)."""
    for spec in (*INPUT_SIGNALS, *OUTPUT_SIGNALS):
        if spec.name == name:
            return spec.description
    for index, suffix in enumerate(HEAD_SUFFIXES):
        if name.endswith(suffix):
            return head_signals([name.removesuffix(suffix)])[index].description
    return name.replace("_", " ")
