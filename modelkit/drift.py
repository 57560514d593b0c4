"""Drift references of model packs, and the simulated site studies they are fitted on.

``sononode model drift-reference PACK`` simulates studies of each vendor the pack was
trained on (the simulator's usual study: random views, its usual nodule prevalence), sends
each through the node's own stages (the files are written as DICOM, then
:func:`workers.pipeline.assess` and :func:`workers.pipeline.analyse` run on them exactly as
in a worker), measures their drift signals (:func:`workers.drift.study_signals`), fits the
reference (:func:`node.drift.reference.fit_group`, one group per vendor and one pooled) and
stores it in the pack (``drift_reference.json``, named with its sha256 in the manifest).

The same functions give ``bench/drift.py`` and the tests their studies, with seeds that
never overlap the reference's (:data:`REFERENCE_SEED`, :data:`BENCH_SEED`,
:data:`TEST_SEED`): nothing is evaluated on what it was fitted on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.drift.reference import (
    DEFAULT_FALSE_ALARMS,
    POOLED,
    GroupReference,
    Projection,
    Reference,
    fit_group,
    fit_projection,
    group_key,
)
from node.drift.signals import ImageSignals, StudySignals, catalogue
from node.drift.vendors import scanner_of
from simulator import simulate_study
from simulator.vendors import TRAINING_VENDORS, VendorStyle
from workers.drift import study_signals
from workers.imaging.pixels import load_instance
from workers.models.inference import Analyser, Analysis
from workers.models.manifest import TaskKind, sha256_file
from workers.models.packs import ModelPack
from workers.pipeline import SourceImage, analyse, assess

logger = logging.getLogger(__name__)

REFERENCE_SEED = 7_000_000
"""First seed of a pack's reference studies."""
BENCH_SEED = 8_000_000
"""First seed of ``bench/drift.py``'s studies."""
TEST_SEED = 9_000_000
"""First seed of the tests' studies."""
REFERENCE_FILE = "drift_reference.json"


# ----------------------------------------------------------------------------------------
# Site studies
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteCondition:
    """How a simulated site's studies are made: the vendor in their headers and, for a
    shift, the style their images are formed with or another nodule prevalence."""

    vendor: str
    image_style: VendorStyle | str | None = None
    nodule_weights: tuple[float, float, float] | None = None
    n_images: int = 6
    size: tuple[int, int] = (480, 640)


#: The simulator's usual thyroid nodule mix (none, benign, malignant) and one with the
#: malignant prevalence doubled.
USUAL_NODULES = (0.4, 0.35, 0.25)
DOUBLED_MALIGNANT = (0.4 * 0.5 / 0.75, 0.35 * 0.5 / 0.75, 0.5)


def site_study_signals(
    analyser: Analyser,
    condition: SiteCondition,
    seed: int,
    *,
    max_frames: int = 16,
    workdir: Path | None = None,
) -> tuple[Analysis, list[tuple[ModelPack, StudySignals]], list[SourceImage]]:
    """Simulate one study, write it as DICOM and run the node's QC and analysis on it."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="drift-study-") as tmp:
        study = simulate_study(Path(tmp), seed=seed, vendor=condition.vendor,
                               n_images=condition.n_images, size=condition.size,
                               image_style=condition.image_style,
                               nodule_weights=condition.nodule_weights)
        sources = [SourceImage(load_instance(f, max_frames=max_frames).without_pixels(), f)
                   for f in study.files]
        study_qc = assess(sources, max_frames=max_frames)
        analysis = analyse(study.study_instance_uid, sources, study_qc, analyser,
                           max_frames=max_frames)
        headers = {s.header.sop_instance_uid: s.header for s in sources}
        stats = {uid: record.stats for uid, record in study_qc.instances.items()}
        return analysis, study_signals(analysis, analyser.packs, headers, stats), sources


def site_studies(
    analyser: Analyser,
    condition: SiteCondition,
    seeds: Sequence[int],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Analysis, list[tuple[ModelPack, StudySignals]]]]:
    """:func:`site_study_signals` for each seed."""
    for i, seed in enumerate(seeds):
        analysis, signals, _ = site_study_signals(analyser, condition, seed)
        if progress is not None:
            progress(i + 1, len(seeds))
        yield analysis, signals


# ----------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectedStudy:
    """A reference study's signals and each image's raw embedding (for the projection)."""

    signals: StudySignals
    embeddings: tuple[tuple[float, ...] | None, ...]

    def to_json(self) -> dict[str, Any]:
        s = self.signals
        return {"manufacturer": s.manufacturer, "model_name": s.model_name, "model": s.model,
                "heads": list(s.heads), "images": [im.to_json() for im in s.images],
                "embeddings": [None if e is None else [round(v, 5) for v in e]
                               for e in self.embeddings]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CollectedStudy:
        signals = StudySignals(
            manufacturer=data["manufacturer"], model_name=data["model_name"],
            model=data["model"], heads=tuple(data["heads"]),
            images=tuple(ImageSignals.from_json(im) for im in data["images"]))
        return cls(signals, tuple(None if e is None else tuple(e) for e in data["embeddings"]))


def collect_reference_studies(
    pack: ModelPack,
    vendor: str,
    seeds: Sequence[int],
    *,
    cache: Path | None = None,
) -> list[CollectedStudy]:
    """The reference studies of one vendor (reused from ``cache`` when it holds them)."""
    path = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        key = f"{pack.name}-{pack.manifest.members[0].sha256[:12]}"
        path = cache / f"reference-{key}-{vendor.replace(' ', '_')}-{seeds[0]}-{len(seeds)}.jsonl"
        if path.exists():
            return [CollectedStudy.from_json(json.loads(line))
                    for line in path.read_text().splitlines()]
    analyser = Analyser([pack])
    out: list[CollectedStudy] = []
    for analysis, signals in site_studies(analyser, SiteCondition(vendor=vendor), seeds):
        raw = tuple(None if o is None else tuple(float(v) for v in o.embedding)
                    for o in analysis.outputs[0])
        for _, study in signals:
            out.append(CollectedStudy(study, raw))
    if path is not None:
        path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in out))
    return out


def fit_pack_reference(
    pack: ModelPack,
    *,
    studies_per_vendor: int = 120,
    vendors: Sequence[str] = TRAINING_VENDORS,
    seed: int = REFERENCE_SEED,
    false_alarms: float = DEFAULT_FALSE_ALARMS,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Reference:
    """Fit ``pack``'s drift reference on simulated studies of ``vendors``."""
    collected: dict[str, list[CollectedStudy]] = {}
    for v, vendor in enumerate(vendors):
        seeds = [seed + v * 100_000 + i for i in range(studies_per_vendor)]
        collected[vendor] = collect_reference_studies(pack, vendor, seeds, cache=cache)
        if progress is not None:
            progress(f"{vendor}: {len(collected[vendor])} studies")
    embeddings = [e for items in collected.values() for c in items for e in c.embeddings
                  if e is not None]
    projection = fit_projection(np.asarray(embeddings)) if embeddings else None
    heads = tuple(t.name for t in pack.tasks.values() if t.kind is TaskKind.CLASSIFICATION)
    specs = catalogue(heads)
    groups: dict[str, GroupReference] = {}
    pooled: list[list[ImageSignals]] = []
    for v, items in enumerate(collected.values()):
        studies = [_project(c, projection) for c in items]
        first = items[0].signals
        key = scanner_of(first.manufacturer, first.model_name)
        groups[group_key(key.vendor, key.scanner)] = fit_group(
            studies, specs, vendor=key.vendor, scanner=key.scanner, seed=seed + v,
            false_alarms=false_alarms)
        pooled.extend(studies)
    groups[POOLED] = fit_group(pooled, specs, vendor=POOLED, scanner=POOLED, seed=seed - 1,
                               false_alarms=false_alarms)
    total = sum(len(items) for items in collected.values())
    usual = SiteCondition(vendor="")
    description = (
        f"{total} simulated studies ({studies_per_vendor} per vendor of "
        f"{', '.join(collected)}; {usual.n_images} images of {usual.size[0]}x{usual.size[1]} "
        f"each, the simulator's usual views and nodule prevalence; seeds from {seed}) sent "
        "through the node's own QC and analysis; thresholds from cross-fitted halves for "
        f"{false_alarms} false-alarm episode(s) per stream and 1,000 studies. Simulated "
        "images only: the reference of a simulated model."
    )
    return Reference(description=description, groups=groups, projection=projection,
                     false_alarms=false_alarms)


def _project(collected: CollectedStudy, projection: Projection | None) -> list[ImageSignals]:
    """The study's image signals with the embedding projected on the fitted axes."""
    images = list(collected.signals.images)
    if projection is None:
        return images
    return [dataclasses.replace(image, embedding=None if raw is None
                                else projection.project(np.asarray(raw)))
            for image, raw in zip(images, collected.embeddings, strict=True)]


def write_reference(folder: Path, reference: Reference) -> Path:
    """Store ``reference`` in the pack in ``folder`` and name it in its manifest."""
    folder = Path(folder)
    path = folder / REFERENCE_FILE
    path.write_text(json.dumps(reference.to_json(), indent=1, sort_keys=True) + "\n")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["drift"] = {"reference": REFERENCE_FILE, "sha256": sha256_file(path),
                         "description": reference.description}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path

