"""Model packs: a folder with ``manifest.json``, weights and statistics, loaded once per worker.

A pack is an artifact, not code (``docs/MODEL_PACK.md`` documents the manifest). Loading
validates the manifest against :data:`FORMAT_VERSION`, verifies the sha256 of every file it
names and builds the network lazily by architecture name; any failure raises a typed
:class:`PackError` (:class:`PackFormatError` or :class:`PackIntegrityError`) whose message
names the pack and the offending field or file.

:meth:`ModelPack.predict` turns grey frames into calibrated per-task probabilities, regression
values, the pooled embedding and an out-of-distribution score, in batches, under
``torch.inference_mode``, with mixed precision on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_sr.model import AlgorithmInfo, CodedLabel
from workers.models.nets import KNOWN_ARCHITECTURES, build_network

logger = logging.getLogger(__name__)

#: Version of the manifest layout this code reads and writes.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Suffix added to the algorithm name of packs trained on simulated images.
SIMULATED_SUFFIX = "(simulated training data, not for clinical use)"
PRIVATE_SCHEME = "99SONONODE"


class PackError(Exception):
    """A model pack could not be loaded."""


class PackFormatError(PackError):
    """The manifest is missing, unreadable, of another format version or invalid."""


class PackIntegrityError(PackError):
    """A file of the pack is missing or its sha256 differs from the manifest's."""


class TaskKind(StrEnum):
    """What a task's output is."""

    CLASSIFICATION = "classification"
    """Softmax over ``labels``, temperature-scaled."""
    REGRESSION = "regression"
    """One value per frame (e.g. image quality in ``[0, 1]``)."""


class TaskRole(StrEnum):
    """Where a task's result goes in the node's report."""

    VIEW = "view"
    """The view (standard plane) of the image: ``ImageResult.view``."""
    FINDING = "finding"
    """A finding (``ImageResult.finding``), usually conditioned on the view."""
    QUALITY = "quality"
    """Image quality score (``ImageResult.quality_score``)."""
    AUXILIARY = "auxiliary"
    """Computed and recorded, not reported."""


class Region(StrEnum):
    """Which pixels the network sees."""

    SCAN_REGION = "scan_region"
    """The ultrasound scan region found by QC (annotations and chrome cropped away)."""
    FULL_FRAME = "full_frame"
    """The whole frame."""


class OODMethod(StrEnum):
    """How a pack scores inputs as out of distribution (higher score = less familiar)."""

    MAHALANOBIS = "mahalanobis"
    """Mahalanobis distance of the pooled embedding to the training embeddings; needs a
    statistics file (``mean`` and ``precision``) fitted on training data."""
    ENERGY = "energy"
    """Energy ``-T * logsumexp(logits / T)`` of a classification task's raw logits (Liu et
    al., NeurIPS 2020); needs no statistics, only a threshold set on in-distribution data."""


class NormalisationMode(StrEnum):
    """How grey values in ``[0, 1]`` are normalised before the network."""

    FIXED = "fixed"
    """``(x - mean) / std`` with the manifest's constants."""
    PER_IMAGE = "per_image"
    """Each frame standardised to zero mean and unit variance."""


# ----------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------
class _Fields:
    """Typed access to one JSON object of the manifest, with precise error messages."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise PackFormatError(f"{where} must be an object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def _get(self, key: str, required: bool) -> object:
        if key not in self.data or self.data[key] is None:
            if required:
                raise PackFormatError(f"{self.where}.{key} is missing")
            return None
        return self.data[key]

    def text(self, key: str, *, required: bool = True, default: str | None = None) -> str:
        value = self._get(key, required)
        if value is None:
            return default  # type: ignore[return-value]
        if not isinstance(value, str) or not value.strip():
            raise PackFormatError(f"{self.where}.{key} must be a non-empty string, got {value!r}")
        return value

    def number(
        self,
        key: str,
        *,
        required: bool = True,
        default: float | None = None,
        low: float | None = None,
        high: float | None = None,
    ) -> float:
        value = self._get(key, required)
        if value is None:
            return default  # type: ignore[return-value]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise PackFormatError(f"{self.where}.{key} must be a finite number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise PackFormatError(f"{self.where}.{key} must be within [{low}, {high}], got {value}")
        return float(value)

    def integer(self, key: str, *, low: int = 1) -> int:
        value = self._get(key, True)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PackFormatError(f"{self.where}.{key} must be an integer >= {low}, got {value!r}")
        return value

    def section(self, key: str, *, required: bool = True) -> _Fields | None:
        value = self._get(key, required)
        return None if value is None else _Fields(value, f"{self.where}.{key}")

    def items(self, key: str, *, required: bool = True, nonempty: bool = True) -> list[Any]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list) or (nonempty and not value):
            raise PackFormatError(f"{self.where}.{key} must be a non-empty list, got {value!r}")
        return value

    def enum(self, key: str, enum: type[StrEnum], *, default: StrEnum | None = None) -> Any:
        value = self.text(key, required=default is None)
        if value is None:
            return default
        try:
            return enum(value)
        except ValueError as exc:
            allowed = ", ".join(m.value for m in enum)
            raise PackFormatError(
                f"{self.where}.{key} must be one of {allowed}, got {value!r}"
            ) from exc


@dataclass(frozen=True)
class LabelSpec:
    """One class of a classification task with its DICOM code."""

    name: str
    code: CodedLabel
    severity: int = 0
    """Order of clinical concern; the study conclusion reports the most severe finding."""


@dataclass(frozen=True)
class OperatingPoint:
    """Decision threshold on ``p(label)`` for a binary finding (e.g. Youden's index)."""

    label: str
    threshold: float
    method: str = "youden"
    sensitivity: float | None = None
    specificity: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One output of the network as the manifest describes it."""

    name: str
    kind: TaskKind
    role: TaskRole
    output: str
    labels: tuple[LabelSpec, ...] = ()
    temperatures: tuple[float, ...] = ()
    """One temperature per ensemble member (1.0 = uncalibrated)."""
    threshold: float = 0.0
    """Confidence floor: below it the node abstains."""
    operating_point: OperatingPoint | None = None
    abstain_labels: frozenset[str] = frozenset()
    applies_to: tuple[str, ...] | None = None
    """View labels for which this task is meaningful (``None``: every view)."""

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def label(self, name: str) -> LabelSpec:
        for spec in self.labels:
            if spec.name == name:
                return spec
        raise KeyError(f"task {self.name!r} has no label {name!r}")


@dataclass(frozen=True)
class InputSpec:
    """What the network expects."""

    height: int
    width: int
    channels: int = 1
    region: Region = Region.SCAN_REGION
    normalisation: NormalisationMode = NormalisationMode.FIXED
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class OODSpec:
    """Out-of-distribution detector: above ``threshold`` an input is out of distribution.

    ``stats``/``sha256`` name the statistics file (Mahalanobis only); ``task`` and
    ``temperature`` select the logits and the energy temperature (energy only).
    """

    method: OODMethod
    threshold: float
    tpr: float | None = None
    """Fraction of in-distribution frames at or below ``threshold`` when it was set."""
    stats: str | None = None
    sha256: str | None = None
    task: str | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class LocalisationSpec:
    """Spatial maps that localise a classification task's label in the input.

    ``output`` is a network output of shape ``(N, K, h, w)``, one map per label of ``task``
    over the network input; the image region of a label is where its map exceeds
    ``fraction`` of the map's range.
    """

    task: str
    output: str
    fraction: float = 0.5


@dataclass(frozen=True)
class MemberSpec:
    """One weights file of the pack (several = ensemble)."""

    weights: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Validated content of ``manifest.json``; :attr:`raw` keeps the whole document."""

    name: str
    version: str
    architecture: str
    architecture_params: Mapping[str, Any]
    members: tuple[MemberSpec, ...]
    input: InputSpec
    tasks: Mapping[str, TaskSpec]
    ood: OODSpec | None
    simulated: bool
    raw: Mapping[str, Any] = field(repr=False)
    localisation: LocalisationSpec | None = None

    @classmethod
    def from_dict(cls, data: object, *, where: str = "manifest") -> Manifest:
        """Validate ``data`` (parsed JSON).

        Raises
        ------
        PackFormatError
            Naming the first missing or invalid field.
        """
        root = _Fields(data, where)
        version = root.integer("format_version")
        if version != FORMAT_VERSION:
            raise PackFormatError(
                f"{where}.format_version is {version}; this node reads format {FORMAT_VERSION}"
            )
        arch = root.section("architecture")
        assert arch is not None
        arch_name = arch.text("name")
        if arch_name not in KNOWN_ARCHITECTURES:
            raise PackFormatError(
                f"{arch.where}.name {arch_name!r} is not one of {', '.join(KNOWN_ARCHITECTURES)}"
            )
        params = arch.section("params", required=False)
        members = []
        for i, item in enumerate(root.items("members")):
            m = _Fields(item, f"{where}.members[{i}]")
            members.append(MemberSpec(weights=_relative(m, "weights"), sha256=_sha(m, "sha256")))
        inp = root.section("input")
        assert inp is not None
        norm = inp.section("normalisation")
        assert norm is not None
        input_spec = InputSpec(
            height=inp.integer("height"),
            width=inp.integer("width"),
            channels=inp.integer("channels"),
            region=inp.enum("region", Region),
            normalisation=norm.enum("mode", NormalisationMode),
            mean=norm.number("mean", required=False, default=0.0),
            std=norm.number("std", required=False, default=1.0, low=1e-6),
        )
        if input_spec.channels not in (1, 3):
            raise PackFormatError(f"{inp.where}.channels must be 1 or 3, got {input_spec.channels}")
        tasks_obj = root.section("tasks")
        assert tasks_obj is not None
        if not tasks_obj.data:
            raise PackFormatError(f"{tasks_obj.where} must name at least one task")
        tasks = {
            str(name): _task(str(name), tasks_obj.section(str(name)), len(members))  # type: ignore[arg-type]
            for name in tasks_obj.data
        }
        views = [t for t in tasks.values() if t.role is TaskRole.VIEW]
        if len(views) > 1:
            raise PackFormatError(f"{where}.tasks: at most one task may have role 'view'")
        for task in tasks.values():
            if task.applies_to is not None:
                if not views:
                    raise PackFormatError(
                        f"{where}.tasks.{task.name}.applies_to needs a task with role 'view'"
                    )
                unknown = set(task.applies_to) - set(views[0].label_names)
                if unknown:
                    raise PackFormatError(
                        f"{where}.tasks.{task.name}.applies_to names unknown views "
                        f"{sorted(unknown)}"
                    )
        ood_obj = root.section("ood", required=False)
        ood = _ood(ood_obj, tasks) if ood_obj is not None else None
        loc_obj = root.section("localisation", required=False)
        localisation = _localisation(loc_obj, tasks) if loc_obj is not None else None
        training = root.section("training_data")
        assert training is not None
        training.text("description")
        simulated = training.data.get("simulated")
        if not isinstance(simulated, bool):
            raise PackFormatError(
                f"{training.where}.simulated must be true or false, got {simulated!r}"
            )
        for key in ("license", "citation"):
            root.text(key)
        root.section("metrics")
        return cls(
            name=root.text("name"),
            version=root.text("version"),
            architecture=arch_name,
            architecture_params=dict(params.data) if params else {},
            members=tuple(members),
            input=input_spec,
            tasks=tasks,
            ood=ood,
            simulated=simulated,
            raw=dict(data),  # type: ignore[call-overload]
            localisation=localisation,
        )


#: Keys of the ``ood`` block that belong to one method only.
_OOD_ONLY: Mapping[OODMethod, tuple[str, ...]] = {
    OODMethod.MAHALANOBIS: ("stats", "sha256"),
    OODMethod.ENERGY: ("task", "temperature"),
}


def _ood(obj: _Fields, tasks: Mapping[str, TaskSpec]) -> OODSpec:
    method: OODMethod = obj.enum("method", OODMethod)
    for other, keys in _OOD_ONLY.items():
        stray = [k for k in keys if other is not method and obj.data.get(k) is not None]
        if stray:
            raise PackFormatError(
                f"{obj.where}.{stray[0]} applies to method '{other.value}' only, "
                f"not '{method.value}'"
            )
    tpr = obj.number("tpr", required=False, low=0.0, high=1.0)
    if method is OODMethod.MAHALANOBIS:
        return OODSpec(
            method=method,
            stats=_relative(obj, "stats"),
            sha256=_sha(obj, "sha256"),
            threshold=obj.number("threshold", low=0.0),
            tpr=tpr,
        )
    views = [t.name for t in tasks.values() if t.role is TaskRole.VIEW]
    task_name = obj.text("task", required=not views, default=views[0] if views else None)
    task = tasks.get(task_name)
    if task is None or task.kind is not TaskKind.CLASSIFICATION:
        known = [t.name for t in tasks.values() if t.kind is TaskKind.CLASSIFICATION]
        raise PackFormatError(
            f"{obj.where}.task must name a classification task ({', '.join(known)}), "
            f"got {task_name!r}"
        )
    return OODSpec(
        method=method,
        # An energy is a negative log-sum-exp: any finite threshold is meaningful.
        threshold=obj.number("threshold"),
        tpr=tpr,
        task=task_name,
        temperature=obj.number("temperature", required=False, default=1.0, low=0.01, high=100),
    )


def _localisation(obj: _Fields, tasks: Mapping[str, TaskSpec]) -> LocalisationSpec:
    views = [t.name for t in tasks.values() if t.role is TaskRole.VIEW]
    task_name = obj.text("task", required=not views, default=views[0] if views else None)
    task = tasks.get(task_name)
    if task is None or task.kind is not TaskKind.CLASSIFICATION:
        raise PackFormatError(
            f"{obj.where}.task must name a classification task, got {task_name!r}"
        )
    output = obj.text("output")
    if output == task.output:
        raise PackFormatError(
            f"{obj.where}.output {output!r} is the task's logits, not spatial maps"
        )
    fraction = obj.number("fraction", required=False, default=0.5, low=0.0, high=1.0)
    if not 0.0 < fraction < 1.0:
        raise PackFormatError(f"{obj.where}.fraction must be within (0, 1), got {fraction}")
    return LocalisationSpec(task=task_name, output=output, fraction=fraction)


def _relative(obj: _Fields, key: str) -> str:
    """A file name inside the pack folder (no absolute path, no ``..``)."""
    name = obj.text(key)
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise PackFormatError(f"{obj.where}.{key} must be a path inside the pack, got {name!r}")
    return name


def _sha(obj: _Fields, key: str) -> str:
    value = obj.text(key).lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise PackFormatError(f"{obj.where}.{key} must be 64 hex digits, got {value!r}")
    return value


def _task(name: str, obj: _Fields, n_members: int) -> TaskSpec:
    kind: TaskKind = obj.enum("kind", TaskKind)
    role: TaskRole = obj.enum("role", TaskRole, default=TaskRole.AUXILIARY)
    output = obj.text("output", required=False, default=name)
    applies = obj.section("applies_to", required=False)
    applies_to: tuple[str, ...] | None = None
    if applies is not None:
        views = applies.items("view")
        if not all(isinstance(v, str) for v in views):
            raise PackFormatError(f"{applies.where}.view must be a list of view label names")
        applies_to = tuple(views)
    if kind is TaskKind.REGRESSION:
        return TaskSpec(name=name, kind=kind, role=role, output=output, applies_to=applies_to)
    labels = []
    for i, item in enumerate(obj.items("labels")):
        lab = _Fields(item, f"{obj.where}.labels[{i}]")
        code = lab.section("code")
        assert code is not None
        try:
            coded = CodedLabel(code.text("value"), code.text("scheme"), code.text("meaning"))
        except ValueError as exc:  # pragma: no cover - _Fields.str already checks
            raise PackFormatError(f"{code.where}: {exc}") from exc
        labels.append(
            LabelSpec(
                name=lab.text("name"),
                code=coded,
                severity=int(lab.number("severity", required=False, default=0)),
            )
        )
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        raise PackFormatError(f"{obj.where}.labels has duplicate names {names}")
    calibration = obj.section("calibration", required=False)
    temperatures: tuple[float, ...] = (1.0,) * n_members
    if calibration is not None:
        method = calibration.text("method")
        if method != "temperature":
            raise PackFormatError(
                f"{calibration.where}.method must be 'temperature', got {method!r}"
            )
        raw = calibration.data.get("temperature")
        values = raw if isinstance(raw, list) else [raw] * n_members
        if len(values) != n_members or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0.01 <= v <= 100
            for v in values
        ):
            raise PackFormatError(
                f"{calibration.where}.temperature must be a number in [0.01, 100] or a list of "
                f"{n_members} such numbers (one per member), got {raw!r}"
            )
        temperatures = tuple(float(v) for v in values if v is not None)
    op_obj = obj.section("operating_point", required=False)
    operating_point = None
    if op_obj is not None:
        operating_point = OperatingPoint(
            label=op_obj.text("label"),
            threshold=op_obj.number("threshold", low=0.0, high=1.0),
            method=op_obj.text("method", required=False, default="youden"),
            sensitivity=op_obj.number("sensitivity", required=False, low=0.0, high=1.0),
            specificity=op_obj.number("specificity", required=False, low=0.0, high=1.0),
        )
        if operating_point.label not in names:
            raise PackFormatError(
                f"{op_obj.where}.label {operating_point.label!r} is not one of {names}"
            )
    abstain = obj.items("abstain_labels", required=False, nonempty=False)
    unknown = [a for a in abstain if a not in names]
    if unknown:
        raise PackFormatError(f"{obj.where}.abstain_labels names unknown labels {unknown}")
    return TaskSpec(
        name=name,
        kind=kind,
        role=role,
        output=output,
        labels=tuple(labels),
        temperatures=temperatures,
        threshold=obj.number("threshold", required=False, default=0.0, low=0.0, high=1.0),
        operating_point=operating_point,
        abstain_labels=frozenset(abstain),
        applies_to=applies_to,
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------
def to_unit_grey(frame: np.ndarray) -> np.ndarray:
    """Return ``frame`` as a float32 ``(H, W)`` grey image in ``[0, 1]``.

    Accepts ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)`` (scaled by 1/255) and floating
    grey images already in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the shape is wrong, the image empty or a float image is outside ``[0, 1]``.
    """
    array = np.asarray(frame)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if np.asarray(frame).dtype == np.uint8:
            array = array / 255.0
    elif array.ndim != 2:
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) frame, got shape {array.shape}")
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.size == 0 or min(array.shape[:2]) < 2:
        raise ValueError(f"frame too small: shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1.0 + 1e-3 or not math.isfinite(high):
        raise ValueError(
            f"float frames must hold grey values in [0, 1], got range [{low:.3g}, {high:.3g}] "
            "(divide 8-bit values by 255)"
        )
    return array


def preprocess(frames: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Stack frames into the network input ``(N, C, H, W)`` float32 tensor.

    Each frame is converted with :func:`to_unit_grey`, resized (bilinear, antialiased) to the
    spec's size, normalised and replicated to the spec's channel count.
    """
    tensors = []
    for frame in frames:
        grey = torch.from_numpy(np.ascontiguousarray(to_unit_grey(frame)))[None, None]
        if tuple(grey.shape[2:]) != (spec.height, spec.width):
            grey = F.interpolate(
                grey,
                size=(spec.height, spec.width),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        tensors.append(grey)
    batch = torch.cat(tensors) if tensors else torch.zeros(0, 1, spec.height, spec.width)
    return normalise(batch, spec)


def normalise(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Normalise a ``(N, 1, H, W)`` batch in ``[0, 1]`` as the spec says."""
    if spec.normalisation is NormalisationMode.PER_IMAGE:
        mean = batch.mean(dim=(1, 2, 3), keepdim=True)
        std = batch.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        batch = (batch - mean) / std
    else:
        batch = (batch - spec.mean) / spec.std
    if spec.channels == 3:
        batch = batch.expand(-1, 3, -1, -1)
    return batch


# ----------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------
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


class OODScorer:
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
    def fit(cls, embeddings: np.ndarray, *, shrinkage: float = 0.1) -> OODScorer:
        """Fit mean and shrunk covariance (Ledoit-Wolf style, fixed ``shrinkage``)."""
        x = np.asarray(embeddings, np.float64)
        mean = x.mean(axis=0)
        cov = np.cov(x, rowvar=False)
        target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * target
        return cls(mean, np.linalg.pinv(cov))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        d = np.asarray(embeddings, np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0.0))

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
    def load(cls, path: Path) -> OODScorer:
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
        return -self.temperature * lse

    def score_outputs(self, raw: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Mean energy over ensemble members, ``(N,)``."""
        for member in raw:
            if self.output not in member:
                raise PackFormatError(
                    f"energy OOD of task {self.task!r} needs output {self.output!r} "
                    f"(outputs: {sorted(member)})"
                )
        return np.mean([self.score_logits(member[self.output]) for member in raw], axis=0)


#: The out-of-distribution scorers a pack can carry (see :class:`OODMethod`).
OODDetector = OODScorer | EnergyScorer


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
        return OODScorer.load(folder / spec.stats)
    except (OSError, ValueError, KeyError) as exc:
        raise PackFormatError(f"model pack {folder}: invalid OOD stats: {exc}") from exc


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
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise PackFormatError(f"model pack {folder}: no {MANIFEST_NAME}")
        try:
            raw_bytes = manifest_path.read_bytes()
            data = json.loads(raw_bytes)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackFormatError(
                f"model pack {folder}: cannot read {MANIFEST_NAME}: {exc}"
            ) from exc
        try:
            manifest = Manifest.from_dict(data, where=f"{manifest_path}")
        except PackFormatError:
            raise
        files = [(m.weights, m.sha256) for m in manifest.members]
        if manifest.ood is not None and manifest.ood.stats and manifest.ood.sha256:
            files.append((manifest.ood.stats, manifest.ood.sha256))
        for name, expected in files:
            file = folder / name
            if not file.is_file():
                raise PackIntegrityError(
                    f"model pack {folder}: file {name} named in the manifest is missing"
                )
            actual = sha256_file(file)
            if actual != expected:
                raise PackIntegrityError(
                    f"model pack {folder}: sha256 of {name} is {actual}, manifest says {expected}: "
                    "the file was modified or corrupted; refusing to load it"
                )
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
        pack = cls(
            manifest,
            networks,
            path=folder,
            ood=ood,
            device=resolved,
            sha256=hashlib.sha256(raw_bytes).hexdigest(),
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
        """Provenance for the SR: name (flagged when simulated), version, manifest sha256."""
        name = self.manifest.name
        if self.manifest.simulated:
            name = f"{name} {SIMULATED_SUFFIX}"
        return AlgorithmInfo(
            name=name,
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
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def write_pack(
    folder: str | Path,
    manifest: Mapping[str, Any],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    ood: OODDetector | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a pack atomically: weights, OOD stats, hashes filled into ``manifest``.

    ``manifest`` is a manifest dict without ``members``/``ood.sha256`` (they are computed).
    ``ood`` is the pack's OOD scorer: a Mahalanobis :class:`OODScorer` is saved as
    ``ood_stats.npz``; an :class:`EnergyScorer` sets ``method``, ``task`` and
    ``temperature``. Threshold and ``tpr`` come from ``manifest["ood"]``. Without ``ood``,
    an energy block of ``manifest`` (which needs no file) is kept and any other dropped.
    The result is validated by :meth:`Manifest.from_dict` before the folder is replaced.
    ``extra_files`` maps file names to text (e.g. ``MODEL_CARD.md``).

    Raises
    ------
    PackFormatError
        If the resulting manifest is invalid (e.g. no OOD threshold).
    """
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a pack is readable like any folder
    try:
        document = json.loads(json.dumps(manifest))
        members = []
        for i, state in enumerate(state_dicts):
            name = "weights.pt" if len(state_dicts) == 1 else f"weights-{i}.pt"
            cpu_state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            torch.save(cpu_state, staging / name)
            members.append({"weights": name, "sha256": sha256_file(staging / name)})
        document["members"] = members
        document["format_version"] = FORMAT_VERSION
        ood_doc = dict(document.get("ood") or {})
        if isinstance(ood, OODScorer):
            ood_doc.setdefault("method", OODMethod.MAHALANOBIS.value)
            ood_doc["stats"] = "ood_stats.npz"
            ood.save(staging / "ood_stats.npz")
            ood_doc["sha256"] = sha256_file(staging / "ood_stats.npz")
            document["ood"] = ood_doc
        elif isinstance(ood, EnergyScorer):
            ood_doc.update(
                method=OODMethod.ENERGY.value, task=ood.task, temperature=ood.temperature
            )
            document["ood"] = ood_doc
        elif ood_doc.get("method") == OODMethod.ENERGY.value:
            document["ood"] = ood_doc
        else:
            document["ood"] = None
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        Manifest.from_dict(document)
        (staging / MANIFEST_NAME).write_text(
            json.dumps(document, indent=2) + "\n", encoding="utf-8"
        )
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The raw manifest dict of the pack folder ``path`` (validated)."""
    folder = Path(path)
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PackFormatError(f"model pack {folder}: cannot read {MANIFEST_NAME}: {exc}") from exc
    Manifest.from_dict(data, where=str(folder / MANIFEST_NAME))
    return dict(data)
