"""A study's drift signals, from QC's statistics, the result and each pack's outputs.

The one place the signals of :mod:`node.drift.signals` are measured: the inference stage
calls it for every study, and the model toolkit for the reference studies a pack's drift
reference is fitted on (``sononode model drift-reference``), so both see the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dicom_sr.model import ImageResult, QCOutcome
from node.drift.signals import ImageSignals, StudySignals
from workers.imaging.types import DecodedInstance
from workers.models.manifest import TaskKind

if TYPE_CHECKING:  # torch: only the inference stage, which has loaded it, calls these
    from workers.models.inference import Analysis, PackOutputs
    from workers.models.packs import ModelPack


def pack_key(pack: ModelPack) -> str:
    """The ``model`` of a pack's drift streams: ``"name version"``."""
    return f"{pack.name} {pack.manifest.version}"


def input_values(image: ImageResult, header: DecodedInstance | None,
                 stats: Mapping[str, float]) -> dict[str, float | str | None]:
    """The pack-independent signals of one image."""
    failed = image.qc_outcome is QCOutcome.FAIL or image.frames_used == 0
    return {
        "intensity_mean": stats.get("mean"),
        "intensity_contrast": stats.get("std"),
        "region_fraction": stats.get("region_fraction"),
        "speckle_grain": stats.get("speckle_grain"),
        "pixel_spacing": stats.get("pixel_spacing_mm"),
        "frames": float(image.frames_total),
        "photometric": (header.photometric_interpretation or None) if header else None,
        "qc_fail_rate": 1.0 if failed else 0.0,
    }


def output_values(image: ImageResult, outputs: PackOutputs | None) -> dict[str, float | str | None]:
    """The signals of what one pack made of one image (nothing when it saw no frame)."""
    if outputs is None:
        return {}
    values: dict[str, float | str | None] = {}
    for head, label in outputs.labels.items():
        values[f"{head}_mix"] = label
        values[f"{head}_confidence"] = outputs.confidence[head]
    for head, probability in outputs.severe.items():
        values[f"{head}_severe"] = probability
    values["ood_score"] = outputs.ood_score
    values["ood_rate"] = 1.0 if outputs.out_of_distribution else 0.0
    values["review_rate"] = 1.0 if image.needs_review else 0.0
    return values


def study_signals(
    analysis: Analysis,
    packs: Sequence[ModelPack],
    headers: Mapping[str, DecodedInstance],
    stats: Mapping[str, Mapping[str, float]],
) -> list[tuple[ModelPack, StudySignals]]:
    """One :class:`StudySignals` per pack and per (manufacturer, model name) of the study.

    ``headers`` and ``stats`` are by SOP Instance UID: each image's header fields (for the
    vendor and photometric interpretation) and QC's statistics.
    """
    out: list[tuple[ModelPack, StudySignals]] = []
    images = analysis.result.images
    for pack, per_image in zip(packs, analysis.outputs, strict=True):
        heads = tuple(t.name for t in pack.tasks.values()
                      if t.kind is TaskKind.CLASSIFICATION)
        projection = pack.drift.projection if pack.drift is not None else None
        by_scanner: dict[tuple[str, str], list[ImageSignals]] = {}
        for image, outputs in zip(images, per_image, strict=True):
            header = headers.get(image.sop_instance_uid)
            values = input_values(image, header, stats.get(image.sop_instance_uid, {}))
            values.update(output_values(image, outputs))
            embedding = None
            if projection is not None and outputs is not None:
                embedding = projection.project(outputs.embedding)
            key = (header.manufacturer if header else "", header.manufacturer_model_name
                   if header else "")
            by_scanner.setdefault(key, []).append(ImageSignals(values, embedding))
        for (manufacturer, model_name), signals in by_scanner.items():
            out.append((pack, StudySignals(manufacturer=manufacturer, model_name=model_name,
                                           model=pack_key(pack), heads=heads,
                                           images=tuple(signals))))
    return out
