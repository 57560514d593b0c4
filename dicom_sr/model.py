"""Typed analysis results: what the workers produce and the SR builder consumes.

These dataclasses are the contract between ``workers/`` (QC, inference) and
``dicom_sr/`` (report building). They hold no pixels and no patient data, only
identifiers, labels and numbers, and they round-trip through plain JSON so the
index can store them (:meth:`StudyResult.to_json`, :meth:`StudyResult.from_json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class QCOutcome(StrEnum):
    """Outcome of a quality-control check, an image or a study."""

    PASS = "pass"
    """The input is fit for the models."""
    WARN = "warn"
    """Usable, but something is off; reported, does not block inference."""
    FAIL = "fail"
    """Not fit for the models: excluded from inference, reported with its reason."""


@dataclass(frozen=True)
class CodedLabel:
    """A coded concept (DICOM code triplet) for a model label.

    Parameters
    ----------
    value
        Code value, e.g. ``"399288005"``.
    scheme
        Coding scheme designator, e.g. ``"SCT"``, ``"DCM"`` or the private ``"99SONONODE"``.
    meaning
        Human-readable code meaning shown in the PACS viewer.
    """

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            text = getattr(self, name)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"CodedLabel.{name} must be a non-empty string, got {text!r}")


@dataclass(frozen=True)
class QCCheck:
    """One quality-control check on one image (or cine loop).

    ``code`` is a stable reason code (``"blank"``, ``"saturated"``, ``"not_us"`` ...);
    ``value`` the measured figure and ``threshold`` the configured limit it was compared with.
    """

    code: str
    outcome: QCOutcome
    message: str
    value: float | None = None
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the form stored in the index)."""
        return {"code": self.code, "outcome": self.outcome.value, "message": self.message,
                "value": self.value, "threshold": self.threshold}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QCCheck:
        """The check :meth:`to_json` wrote."""
        return cls(code=data["code"], outcome=QCOutcome(data["outcome"]), message=data["message"],
                   value=data.get("value"), threshold=data.get("threshold"))


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of a model pack, written into every SR (TID 4019 algorithm identification)."""

    name: str
    version: str
    sha256: str
    simulated_training_data: bool = False
    """True when the pack was trained on simulated images: never for clinical use."""


@dataclass(frozen=True)
class Classification:
    """A calibrated classification of one image or of the whole study.

    ``probability`` is the calibrated (temperature-scaled) probability of ``label``.
    ``abstained`` is True when the node withholds the result (confidence below
    ``threshold``, input out of distribution, QC failure); ``reason`` then says why.
    """

    task: str
    label: str
    code: CodedLabel
    probability: float
    algorithm: AlgorithmInfo
    threshold: float | None = None
    abstained: bool = False
    reason: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability}")


@dataclass(frozen=True)
class ImageResult:
    """Everything the node concluded about one source instance (image or cine loop)."""

    sop_instance_uid: str
    sop_class_uid: str
    qc_outcome: QCOutcome
    qc_checks: tuple[QCCheck, ...] = ()
    frames_total: int = 1
    frames_used: int = 0
    view: Classification | None = None
    finding: Classification | None = None
    quality_score: float | None = None
    ood_score: float | None = None
    out_of_distribution: bool = False
    region: tuple[int, int, int, int] | None = None
    """Bounding box ``(column0, row0, column1, row1)`` in pixel coordinates, the region the
    result refers to: where the model localised its label (``region_localised``), else the
    scan region it analysed."""
    region_localised: bool = False
    """True when ``region`` is where the model localised its label, not the scan region."""
    key_frame: int | None = None
    """1-based number, within the instance, of the frame the result is best shown on (the
    most confident analysed frame of a cine loop); ``None`` for a single frame."""
    needs_review: bool = False
    review_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudyResult:
    """The study-level result: per-image results, conclusion and review flag."""

    study_instance_uid: str
    images: tuple[ImageResult, ...]
    algorithms: tuple[AlgorithmInfo, ...]
    conclusion: Classification | None = None
    assessable: bool = True
    needs_review: bool = False
    review_reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the form stored in the index)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyResult:
        """The result :meth:`to_json` wrote.

        Raises
        ------
        ValueError
            If a required key is missing or a value is invalid.
        """
        return _study_result(data)


def _classification(data: Mapping[str, Any] | None) -> Classification | None:
    if data is None:
        return None
    return Classification(
        task=data["task"],
        label=data["label"],
        code=CodedLabel(**data["code"]),
        probability=float(data["probability"]),
        algorithm=AlgorithmInfo(**data["algorithm"]),
        threshold=data.get("threshold"),
        abstained=bool(data.get("abstained", False)),
        reason=data.get("reason"),
    )


def _study_result(data: Mapping[str, Any]) -> StudyResult:
    try:
        images = tuple(
            ImageResult(
                sop_instance_uid=img["sop_instance_uid"],
                sop_class_uid=img["sop_class_uid"],
                qc_outcome=QCOutcome(img["qc_outcome"]),
                qc_checks=tuple(QCCheck.from_json(c) for c in img.get("qc_checks", ())),
                frames_total=int(img.get("frames_total", 1)),
                frames_used=int(img.get("frames_used", 0)),
                view=_classification(img.get("view")),
                finding=_classification(img.get("finding")),
                quality_score=img.get("quality_score"),
                ood_score=img.get("ood_score"),
                out_of_distribution=bool(img.get("out_of_distribution", False)),
                region=tuple(img["region"]) if img.get("region") is not None else None,
                region_localised=bool(img.get("region_localised", False)),
                key_frame=img.get("key_frame"),
                needs_review=bool(img.get("needs_review", False)),
                review_reasons=tuple(img.get("review_reasons", ())),
            )
            for img in data["images"]
        )
        return StudyResult(
            study_instance_uid=data["study_instance_uid"],
            images=images,
            algorithms=tuple(AlgorithmInfo(**a) for a in data["algorithms"]),
            conclusion=_classification(data.get("conclusion")),
            assessable=bool(data.get("assessable", True)),
            needs_review=bool(data.get("needs_review", False)),
            review_reasons=tuple(data.get("review_reasons", ())),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed study result: {exc}") from exc
