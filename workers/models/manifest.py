"""The model pack manifest: its schema, validated, without torch or numpy.

A pack is an artifact, not code (``docs/MODEL_PACK.md`` documents the manifest). This module
reads ``manifest.json`` into a typed :class:`Manifest` with precise :class:`PackFormatError`
messages, and nothing heavier: the API (``/models``) and ``sononode model info`` read packs
through it without building a network. :mod:`workers.models.packs` loads the weights the
manifest names; :mod:`modelkit.pack_writer` writes packs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_sr.model import CodedLabel

#: Version of the manifest layout this code reads and writes.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Network architectures a manifest may name (built by :func:`workers.models.nets.build_network`).
KNOWN_ARCHITECTURES: tuple[str, ...] = ("multitask_mobilenet", "sononet16")


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


def _layout(fields: _Fields) -> CaptureLayout:
    rows, columns = fields.integer("rows"), fields.integer("columns")
    crop = fields.items("crop")
    if (
        len(crop) != 4
        or any(isinstance(v, bool) or not isinstance(v, int) for v in crop)
        or not (0 <= crop[0] < crop[2] <= columns and 0 <= crop[1] < crop[3] <= rows)
    ):
        raise PackFormatError(
            f"{fields.where}.crop must be [column0, row0, column1, row1] integers inside the "
            f"{rows} x {columns} frame, got {crop!r}"
        )
    return CaptureLayout(rows=rows, columns=columns, crop=(crop[0], crop[1], crop[2], crop[3]),
                         source=fields.text("source", required=False, default=""))


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
class CaptureLayout:
    """A frame layout whose image area the pack's training data cropped at a fixed place.

    Frames of exactly ``rows`` x ``columns`` pixels are cropped to ``crop`` (``(column0,
    row0, column1, row1)``, exclusive end), unmasked, as the weights were trained, instead
    of to QC's detected scan region: a detected region that includes the vendor's on-image
    annotations gives the network another scale and aspect than it learnt (the SonoNet
    captures; ``docs/MODEL_PACK.md``). ``source`` says where the crop comes from.
    """

    rows: int
    columns: int
    crop: tuple[int, int, int, int]
    source: str = ""


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
    layouts: tuple[CaptureLayout, ...] = ()
    """Fixed crops for frames of known capture layouts (``scan_region`` packs only)."""


@dataclass(frozen=True)
class ImageOODSpec:
    """The image-statistics part of a pack's OOD detector
    (:mod:`workers.models.image_statistics`): above ``threshold`` an image's grey levels
    and texture are unlike the training images'."""

    stats: str
    sha256: str
    threshold: float
    tpr: float | None = None
    """Fraction of the held-out in-distribution frames at or below ``threshold``."""
    frames: int | None = None
    """Held-out in-distribution frames the threshold was set on."""


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
    image: ImageOODSpec | None = None
    """Image statistics beside the score (an image is out of distribution when either is
    above its threshold); ``None``: the score alone."""


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
class DriftSpec:
    """The pack's drift reference (:mod:`node.drift.reference`): a JSON file in the pack."""

    reference: str
    sha256: str


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
    drift: DriftSpec | None = None
    sha256: str = "0" * 64
    """sha256 of ``manifest.json`` (:func:`read_manifest` sets it; zeros for a manifest
    built in memory)."""

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
            layouts=tuple(
                _layout(_Fields(item, f"{inp.where}.layouts[{i}]"))
                for i, item in enumerate(inp.items("layouts", required=False))
            ),
        )
        if input_spec.layouts and input_spec.region is not Region.SCAN_REGION:
            raise PackFormatError(f"{inp.where}.layouts needs region 'scan_region'")
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
        drift_obj = root.section("drift", required=False)
        drift = (
            DriftSpec(reference=_relative(drift_obj, "reference"), sha256=_sha(drift_obj, "sha256"))
            if drift_obj is not None
            else None
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
            localisation=localisation,
            drift=drift,
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
    image_obj = obj.section("image", required=False)
    image = None
    if image_obj is not None:
        frames = image_obj.data.get("frames")
        image = ImageOODSpec(
            stats=_relative(image_obj, "stats"),
            sha256=_sha(image_obj, "sha256"),
            threshold=image_obj.number("threshold", low=0.0),
            tpr=image_obj.number("tpr", required=False, low=0.0, high=1.0),
            frames=image_obj.integer("frames") if frames is not None else None,
        )
    if method is OODMethod.MAHALANOBIS:
        return OODSpec(
            method=method,
            stats=_relative(obj, "stats"),
            sha256=_sha(obj, "sha256"),
            threshold=obj.number("threshold", low=0.0),
            tpr=tpr,
            image=image,
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
        image=image,
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


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of the pack folder ``path``.

    The result's :attr:`Manifest.sha256` is the hash of the file's bytes: the identity of the
    pack in every report.

    Raises
    ------
    PackFormatError
        If there is no readable ``manifest.json`` or it is invalid.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackFormatError(f"model pack {folder}: no {MANIFEST_NAME}")
    try:
        raw_bytes = manifest_path.read_bytes()
        data = json.loads(raw_bytes)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackFormatError(f"model pack {folder}: cannot read {MANIFEST_NAME}: {exc}") from exc
    manifest = Manifest.from_dict(data, where=str(manifest_path))
    return dataclasses.replace(manifest, sha256=hashlib.sha256(raw_bytes).hexdigest())


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Check that every file the manifest names is in ``folder`` with its sha256.

    Raises
    ------
    PackIntegrityError
        Naming the missing or modified file.
    """
    root = Path(folder)
    files = [(m.weights, m.sha256) for m in manifest.members]
    if manifest.ood is not None and manifest.ood.stats and manifest.ood.sha256:
        files.append((manifest.ood.stats, manifest.ood.sha256))
    if manifest.ood is not None and manifest.ood.image is not None:
        files.append((manifest.ood.image.stats, manifest.ood.image.sha256))
    if manifest.drift is not None:
        files.append((manifest.drift.reference, manifest.drift.sha256))
    for name, expected in files:
        file = root / name
        if not file.is_file():
            raise PackIntegrityError(
                f"model pack {root}: file {name} named in the manifest is missing"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise PackIntegrityError(
                f"model pack {root}: sha256 of {name} is {actual}, manifest says {expected}: "
                "the file was modified or corrupted; refusing to load it"
            )


def abstention_rules(manifest: Manifest) -> list[str]:
    """When the node withholds or doubts this pack's results, in the order it decides:
    one rule per pack, combining QC, the OOD score, the labels it never reports and the
    confidence floors (what :class:`workers.models.inference.Analyser` does with it, and
    what ``/models`` and the model card show)."""
    rules = [
        "QC fails the image (no scan region, blank or saturated, too small...): not "
        "assessable; no view and no finding are reported; the image needs review."
    ]
    ood = manifest.ood
    if ood is not None:
        share = f", set to keep {ood.tpr:.0%} of in-distribution frames" if ood.tpr else ""
        rules.append(
            f"{ood.method.value.capitalize()} score above {ood.threshold:g}{share}: out of "
            "distribution; no view and no finding are reported; the image needs review."
        )
        if ood.image is not None:
            kept = f", set to keep {ood.image.tpr:.1%} of" if ood.image.tpr else ", set on"
            rests = f" {ood.image.frames}" if ood.image.frames else ""
            rules.append(
                f"Image statistics (grey levels and texture as received) at a Mahalanobis "
                f"distance above {ood.image.threshold:g} from those of the training images "
                f"of the predicted view{kept}{rests} held-out in-distribution frames: out of "
                "distribution, as above."
            )
    else:
        rules.append("No out-of-distribution detector: unfamiliar input is caught only by "
                     "QC and the rules below.")
    for task in manifest.tasks.values():
        if task.kind is not TaskKind.CLASSIFICATION:
            continue
        title = task.name.replace("_", " ")
        for label in sorted(task.abstain_labels):
            rules.append(f"{title.capitalize()} '{label}' is never the image's result: it is "
                         "shown as the best guess with its probability, marked not "
                         "confident; the image needs review.")
        if task.applies_to is not None:
            rules.append(f"{title.capitalize()} is assessed only on the views "
                         f"{', '.join(task.applies_to)}, and not confidently while the view "
                         "is uncertain.")
        op = task.operating_point
        if op is not None:
            rules.append(f"{title.capitalize()} '{op.label}' is called when its probability "
                         f"is at least {op.threshold:.1%} ({op.method}), never withheld for "
                         "low probability.")
        rules.append(
            f"{title.capitalize()} below {task.threshold:.0%} probability (or "
            "SONONODE_REVIEW_CONFIDENCE if higher): the best guess is shown with its "
            "probability, marked not confident; the image needs review."
        )
    rules.append("While the vendor, scanner and pack are in drift alert, every result needs "
                 "review and says why.")
    return rules


def describe_packs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """For ``/models``: per pack folder its manifest (without the OOD statistics' details)
    and sha256, or the error that keeps it from loading."""
    described: list[dict[str, Any]] = []
    for path in paths:
        try:
            manifest = read_manifest(path)
        except PackError as exc:
            described.append({"path": str(path), "error": str(exc)})
            continue
        entry = {"path": str(path), **manifest.raw, "manifest_sha256": manifest.sha256,
                 "abstention": abstention_rules(manifest)}
        entry.pop("ood_stats", None)
        described.append(entry)
    return described
