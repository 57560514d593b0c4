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
    """Out-of-distribution detector on the embedding."""

    method: str
    stats: str
    sha256: str
    threshold: float
    tpr: float | None = None


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
        ood = None
        if ood_obj is not None:
            method = ood_obj.text("method")
            if method != "mahalanobis":
                raise PackFormatError(
                    f"{ood_obj.where}.method must be 'mahalanobis', got {method!r}"
                )
            ood = OODSpec(
                method=method,
                stats=_relative(ood_obj, "stats"),
                sha256=_sha(ood_obj, "sha256"),
                threshold=ood_obj.number("threshold", low=0.0),
                tpr=ood_obj.number("tpr", required=False, low=0.0, high=1.0),
            )
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
        )


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
    regression tasks; ``embedding`` is ``(N, D)`` (first member); ``ood_score`` ``(N,)``
    Mahalanobis distances, ``None`` when the pack has no OOD detector.
    """

    probabilities: Mapping[str, np.ndarray]
    values: Mapping[str, np.ndarray]
    embedding: np.ndarray
    ood_score: np.ndarray | None

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
    """Mahalanobis distance of an embedding to the training distribution."""

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

    def save(self, path: Path) -> None:
        np.savez(
            path, mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32)
        )

    @classmethod
    def load(cls, path: Path) -> OODScorer:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["precision"])


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
        ood: OODScorer | None = None,
        device: str | torch.device = "auto",
        sha256: str = "0" * 64,
    ) -> None:
        if len(networks) != len(manifest.members):
            raise ValueError(
                f"{len(networks)} networks for {len(manifest.members)} manifest members"
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
        if manifest.ood is not None:
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
        ood = None
        if manifest.ood is not None:
            try:
                ood = OODScorer.load(folder / manifest.ood.stats)
            except (OSError, ValueError, KeyError) as exc:
                raise PackFormatError(f"model pack {folder}: invalid OOD stats: {exc}") from exc
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
        ood = self.ood.score(embedding).astype(np.float32) if self.ood is not None else None
        return Prediction(probabilities, values, embedding.astype(np.float32), ood)

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
    ood: OODScorer | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a pack atomically: weights, OOD stats, hashes filled into ``manifest``.

    ``manifest`` is a manifest dict without ``members``/``ood.sha256`` (they are computed);
    ``ood`` (if any) uses ``manifest["ood"]`` for method and threshold. The result is
    validated by :meth:`Manifest.from_dict` before the folder is replaced.
    ``extra_files`` maps file names to text (e.g. ``MODEL_CARD.md``).
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
        if ood is not None:
            ood_doc = dict(document.get("ood") or {})
            ood_doc.setdefault("method", "mahalanobis")
            ood_doc["stats"] = "ood_stats.npz"
            ood.save(staging / "ood_stats.npz")
            ood_doc["sha256"] = sha256_file(staging / "ood_stats.npz")
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
