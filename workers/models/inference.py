"""Study-level inference: frames of every usable image through every pack, then decisions.

:class:`Analyser` is built once per worker process with the loaded packs. For one study it

1. samples at most ``max_frames`` usable frames per image (evenly over a cine loop),
2. crops each frame to the pack's region (``workers.qc.frame_for_model``: QC's scan region,
   outside of the sector masked, as in training; :func:`model_input`),
3. runs all frames of the study through each pack in batches of ``batch_size``,
4. averages calibrated probabilities over the frames of each image (cine loop),
5. decides view and finding per image with abstention (confidence floor, abstain labels,
   out-of-distribution input, failed QC) and review flags,
6. localises the view in the frame when the pack has spatial maps (``localisation`` in the
   manifest, e.g. SonoNet's class maps; :func:`box_from_map`), else reports QC's scan region,
7. concludes the study with the most severe confident finding.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicom_sr.model import (
    AlgorithmInfo,
    Classification,
    ImageResult,
    QCCheck,
    QCOutcome,
    StudyResult,
)
from workers.models.packs import Prediction, Region, TaskKind, TaskRole, TaskSpec

if TYPE_CHECKING:
    from workers.imaging import DecodedInstance, InstanceQC, PreparedInstance
    from workers.models.packs import ModelPack

logger = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

Box = tuple[int, int, int, int]
"""``(column0, row0, column1, row1)`` in frame pixels, exclusive end (as ``InstanceQC``)."""


def _qc_frame_function() -> Callable[..., np.ndarray] | None:
    """``workers.qc.frame_for_model`` if that module provides it."""
    try:
        qc = importlib.import_module("workers.qc")
    except ImportError:
        return None
    return getattr(qc, "frame_for_model", None)


def grey_frame(instance: DecodedInstance, index: int) -> np.ndarray:
    """Frame ``index`` of ``instance`` as float32 grey in ``[0, 1]``."""
    frame = instance.frames[index]
    if frame.ndim == 3:
        return (frame[..., :3].astype(np.float32) @ _LUMA) / 255.0
    return frame.astype(np.float32) / 255.0


def _clipped_region(qc: InstanceQC, shape: tuple[int, ...]) -> Box | None:
    """QC's scan region clipped to a frame of ``shape``; ``None`` when absent or tiny."""
    if qc.scan_region is None:
        return None
    c0, r0, c1, r1 = qc.scan_region
    rows, cols = shape[:2]
    c0, c1 = max(0, c0), min(cols, c1)
    r0, r1 = max(0, r0), min(rows, r1)
    if c1 - c0 < 8 or r1 - r0 < 8:
        return None
    return c0, r0, c1, r1


def crop_scan_region(instance: DecodedInstance, qc: InstanceQC, index: int) -> np.ndarray:
    """Grey float32 crop of QC's scan region (the whole frame when QC found none)."""
    grey = grey_frame(instance, index)
    box = _clipped_region(qc, grey.shape)
    if box is None:
        return grey
    c0, r0, c1, r1 = box
    return grey[r0:r1, c0:c1]


def input_box(item: PreparedInstance, region: Region) -> Box:
    """The part of the frame a pack with input ``region`` sees, in frame pixels."""
    rows, cols = item.instance.frames.shape[1:3]
    box = _clipped_region(item.qc, (rows, cols)) if region is Region.SCAN_REGION else None
    return box if box is not None else (0, 0, int(cols), int(rows))


def with_scan_mask(item: PreparedInstance) -> PreparedInstance:
    """``item`` with QC's scan mask restored when only its bounding box was kept.

    The pipeline stores QC's outcome as JSON between stages, keeping the scan region's
    bounding box but not its mask. The models were trained on crops with the outside of the
    sector masked (:func:`workers.qc.frame_for_model`), so the mask is found again on the
    same decoded frames (the detection is deterministic); it is used only when it gives the
    same bounding box as QC did.
    """
    qc, frames = item.qc, item.instance.frames
    if qc.scan_region is None or qc.scan_mask is not None or qc.failed or frames.shape[0] == 0:
        return item
    from workers.scan_region import find_scan_region

    found = find_scan_region(frames, item.instance.us_regions)
    if found is None or tuple(found.bbox) != tuple(qc.scan_region):
        logger.warning(
            "scan region of %s found again as %s, QC had %s: cropping QC's box unmasked",
            item.instance.sop_instance_uid,
            None if found is None else found.bbox,
            qc.scan_region,
        )
        return item
    return dataclasses.replace(item, qc=dataclasses.replace(qc, scan_mask=found.mask))


def model_input(
    item: PreparedInstance,
    index: int,
    region: Region,
    *,
    frame_for_model: Callable[..., np.ndarray] | None = None,
) -> np.ndarray:
    """Grey float32 frame in ``[0, 1]`` that a pack with input ``region`` is shown.

    ``scan_region``: ``frame_for_model`` (default :func:`workers.qc.frame_for_model`: QC's
    scan region, masked outside the sector) when QC found a region and its mask, else the
    unmasked crop of QC's box, else the whole frame. ``full_frame``: the whole frame.
    """
    if region is Region.FULL_FRAME:
        return grey_frame(item.instance, index)
    crop_fn = frame_for_model if frame_for_model is not None else _qc_frame_function()
    if crop_fn is not None and item.qc.scan_region is not None and item.qc.scan_mask is not None:
        try:
            return _unit(crop_fn(item.instance, item.qc, index))
        except (ValueError, IndexError) as exc:
            logger.warning(
                "frame_for_model failed on %s frame %d (%s); cropping the scan region",
                item.instance.sop_instance_uid,
                index,
                exc,
            )
    return crop_scan_region(item.instance, item.qc, index)


def box_from_map(heat: np.ndarray, box: Box, *, fraction: float = 0.5) -> Box:
    """Image region where a spatial map is high, in frame pixels.

    ``heat`` ``(h, w)`` covers the network input, i.e. the frame's ``box``. It is upsampled
    bilinearly to the box, rescaled to ``[0, 1]`` between its minimum and maximum and
    thresholded at ``fraction``; the bounding box of the largest connected component is
    returned, shifted to frame coordinates (the whole ``box`` for a flat map).

    Raises
    ------
    ValueError
        If ``heat`` is not 2-D, ``box`` is empty or ``fraction`` is outside ``(0, 1)``.
    """
    array = np.asarray(heat, np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"heat map must be (h, w), got shape {array.shape}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    c0, r0, c1, r1 = (int(v) for v in box)
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"box {box} is empty")
    up = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(array))[None, None],
        size=(r1 - r0, c1 - c0),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    low, high = float(up.min()), float(up.max())
    if not high - low > 1e-12:
        return c0, r0, c1, r1
    mask = (up - low) / (high - low) > fraction
    labels, count = ndimage.label(mask)
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    rows, cols = ndimage.find_objects(labels)[int(np.argmax(areas))]
    return c0 + cols.start, r0 + rows.start, c0 + cols.stop, r0 + rows.stop


def _unit(frame: np.ndarray) -> np.ndarray:
    """Float grey in [0, 1] whatever scale the QC crop uses."""
    array = np.asarray(frame)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32) @ _LUMA
        if np.asarray(frame).dtype == np.uint8:
            return array / 255.0
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32, copy=False)
    if array.size and float(array.max()) > 1.0 + 1e-3:
        array = array / 255.0
    return np.clip(array, 0.0, 1.0)


def sample_frames(usable: Sequence[int], max_frames: int) -> list[int]:
    """At most ``max_frames`` of ``usable``, evenly spread (first and last included)."""
    if len(usable) <= max_frames:
        return list(usable)
    picks = np.linspace(0, len(usable) - 1, max_frames).round().astype(int)
    return [usable[i] for i in sorted(set(picks.tolist()))]


@dataclass(frozen=True)
class _Decision:
    label: str
    probability: float
    abstained: bool
    reason: str | None


class Analyser:
    """Runs model packs over the prepared instances of a study.

    Parameters
    ----------
    packs
        Loaded packs; the first with a ``view`` task gives ``ImageResult.view``; findings come
        from every pack (the most severe confident one is reported).
    batch_size
        Frames per forward pass, across images of the study.
    max_frames
        Frames sampled per cine loop.
    review_confidence
        Extra confidence floor on top of each task's manifest threshold (0 = none).
    """

    def __init__(
        self,
        packs: Sequence[ModelPack],
        *,
        batch_size: int = 32,
        max_frames: int = 16,
        review_confidence: float = 0.0,
    ) -> None:
        if not packs:
            raise ValueError("Analyser needs at least one model pack")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if not 0.0 <= review_confidence <= 1.0:
            raise ValueError(f"review_confidence must be within [0, 1], got {review_confidence}")
        self.packs = list(packs)
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.review_confidence = review_confidence
        self._frame_for_model = _qc_frame_function()

    @property
    def algorithms(self) -> tuple[AlgorithmInfo, ...]:
        return tuple(pack.algorithm for pack in self.packs)

    # -- frames ----------------------------------------------------------------------------
    def _crop(self, item: PreparedInstance, index: int, region: Region) -> np.ndarray:
        return model_input(item, index, region, frame_for_model=self._frame_for_model)

    # -- decisions -------------------------------------------------------------------------
    def _decide(self, task: TaskSpec, probs: np.ndarray) -> _Decision:
        names = task.label_names
        op = task.operating_point
        positive = False
        if op is not None:
            pos = names.index(op.label)
            if probs[pos] >= op.threshold:
                i, positive = pos, True
            else:
                others = probs.copy()
                others[pos] = -1.0
                i = int(np.argmax(others))
        else:
            i = int(np.argmax(probs))
        label, probability = names[i], float(probs[i])
        floor = max(task.threshold, self.review_confidence)
        if label in task.abstain_labels:
            return _Decision(label, probability, True, f"{task.name}: '{label}' is not reportable")
        if not positive and probability < floor:
            return _Decision(
                label,
                probability,
                True,
                f"{task.name}: confidence {probability:.2f} below threshold {floor:.2f}",
            )
        return _Decision(label, probability, False, None)

    @staticmethod
    def _classification(
        pack: ModelPack, task: TaskSpec, decision: _Decision, *, reason: str | None = None
    ) -> Classification:
        abstained = decision.abstained or reason is not None
        threshold = (
            task.operating_point.threshold
            if (task.operating_point is not None and decision.label == task.operating_point.label)
            else task.threshold
        )
        return Classification(
            task=task.name,
            label=decision.label,
            code=task.label(decision.label).code,
            probability=min(1.0, max(0.0, decision.probability)),
            algorithm=pack.algorithm,
            threshold=threshold,
            abstained=abstained,
            reason=reason if reason is not None else decision.reason,
        )

    # -- study -----------------------------------------------------------------------------
    def analyse_study(
        self,
        study_uid: str,
        prepared: Sequence[PreparedInstance],
        *,
        assessable: bool = True,
        study_checks: Sequence[QCCheck] = (),
    ) -> StudyResult:
        """Analyse the prepared instances of one study.

        Images whose QC failed are reported without classification; the others get a view and
        (where a finding task applies to that view) a finding, each possibly abstained.
        """
        selected: list[list[int]] = []
        for item in prepared:
            usable = [] if item.qc.failed else list(item.qc.usable_frames)
            usable = [i for i in usable if 0 <= i < item.instance.frames.shape[0]]
            selected.append(sample_frames(usable, self.max_frames))
        if any(p.input.region is Region.SCAN_REGION for p in self.packs):
            prepared = [
                with_scan_mask(item) if frames else item
                for item, frames in zip(prepared, selected, strict=True)
            ]

        per_pack: list[list[Prediction | None]] = []
        for pack in self.packs:
            crops = [
                self._crop(item, index, pack.input.region)
                for item, frames in zip(prepared, selected, strict=True)
                for index in frames
            ]
            prediction = pack.predict(crops, batch_size=self.batch_size) if crops else None
            per_image: list[Prediction | None] = []
            start = 0
            for frames in selected:
                if not frames or prediction is None:
                    per_image.append(None)
                    continue
                per_image.append(_slice(prediction, start, start + len(frames)))
                start += len(frames)
            per_pack.append(per_image)

        images = tuple(
            self._image_result(item, frames, [preds[i] for preds in per_pack])
            for i, (item, frames) in enumerate(zip(prepared, selected, strict=True))
        )
        return self._study_result(study_uid, images, assessable, study_checks)

    def _image_result(
        self,
        item: PreparedInstance,
        frames: list[int],
        predictions: list[Prediction | None],
    ) -> ImageResult:
        inst, qc = item.instance, item.qc
        base = {
            "sop_instance_uid": inst.sop_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "qc_outcome": qc.outcome,
            "qc_checks": tuple(qc.checks),
            "frames_total": max(int(inst.number_of_frames), 1),
            "frames_used": len(frames),
            "region": tuple(int(v) for v in qc.scan_region) if qc.scan_region else None,
        }
        if not frames or all(p is None for p in predictions):
            failing = [c.message for c in qc.checks if c.outcome is QCOutcome.FAIL]
            if qc.outcome is QCOutcome.FAIL or failing:
                reason = "QC failed" + (": " + "; ".join(failing) if failing else "")
            else:
                reason = "no usable frame"
            return ImageResult(**base, needs_review=True, review_reasons=(reason,))  # type: ignore[arg-type]

        reasons: list[str] = []
        view: Classification | None = None
        located: Box | None = None
        findings: list[Classification] = []
        quality: float | None = None
        ood_score: float | None = None
        ood = False
        for pack, prediction in zip(self.packs, predictions, strict=True):
            if prediction is None:
                continue
            pack_ood_reason = None
            if prediction.ood_score is not None and pack.manifest.ood is not None:
                score = float(np.mean(prediction.ood_score))
                if ood_score is None:
                    ood_score = score
                if score > pack.manifest.ood.threshold:
                    ood = True
                    pack_ood_reason = (
                        f"input out of distribution for {pack.name} "
                        f"({pack.manifest.ood.method.value} score {score:.2f} > "
                        f"threshold {pack.manifest.ood.threshold:.2f})"
                    )
                    reasons.append(pack_ood_reason)
            mean_probs = {k: v.mean(axis=0) for k, v in prediction.probabilities.items()}
            pack_view: _Decision | None = None
            view_task = pack.view_task
            if view_task is not None:
                pack_view = self._decide(view_task, mean_probs[view_task.name])
                if view is None:
                    view = self._classification(pack, view_task, pack_view, reason=pack_ood_reason)
                    if not view.abstained:
                        located = _locate(pack, view_task, view.label, prediction, item)
            for task in pack.tasks.values():
                if task.kind is TaskKind.REGRESSION:
                    if task.role is TaskRole.QUALITY and quality is None:
                        quality = float(np.clip(prediction.values[task.name].mean(), 0.0, 1.0))
                    continue
                if task.role is not TaskRole.FINDING:
                    continue
                if task.applies_to is not None:
                    if pack_view is None or pack_view.label not in task.applies_to:
                        continue
                    if pack_view.abstained:
                        decision = self._decide(task, mean_probs[task.name])
                        findings.append(
                            self._classification(
                                pack,
                                task,
                                decision,
                                reason=pack_ood_reason or f"{task.name}: view uncertain",
                            )
                        )
                        continue
                decision = self._decide(task, mean_probs[task.name])
                findings.append(self._classification(pack, task, decision, reason=pack_ood_reason))

        finding = _most_severe(findings, self.packs)
        for classification in (view, finding):
            if (
                classification is not None
                and classification.abstained
                and classification.reason
                and classification.reason not in reasons
            ):
                reasons.append(classification.reason)
        if located is not None:
            base["region"] = located
        return ImageResult(
            **base,  # type: ignore[arg-type]
            view=view,
            finding=finding,
            quality_score=quality,
            ood_score=ood_score,
            out_of_distribution=ood,
            needs_review=bool(reasons),
            review_reasons=tuple(reasons),
        )

    def _study_result(
        self,
        study_uid: str,
        images: tuple[ImageResult, ...],
        assessable: bool,
        study_checks: Sequence[QCCheck],
    ) -> StudyResult:
        reasons: list[str] = []
        if not assessable:
            failing = [c.message for c in study_checks if c.outcome is QCOutcome.FAIL]
            reasons.append("study not assessable" + (": " + "; ".join(failing) if failing else ""))
        else:
            reasons.extend(
                f"study check {c.code}: {c.message}"
                for c in study_checks
                if c.outcome is QCOutcome.FAIL
            )
        if not images:
            reasons.append("no image to analyse")
        elif all(img.frames_used == 0 for img in images):
            reasons.append("no image passed QC")
        flagged = [img for img in images if img.needs_review]
        if flagged:
            counts = Counter(_reason_kind(r) for img in flagged for r in img.review_reasons)
            reasons.append(
                f"{len(flagged)} of {len(images)} image(s) need review ("
                + ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())
                + ")"
            )
        findings = [img.finding for img in images if img.finding is not None]
        conclusion = _most_severe(findings, self.packs)
        if conclusion is not None and not assessable and not conclusion.abstained:
            conclusion = _abstain(conclusion, "study not assessable by QC")
        if conclusion is not None and conclusion.abstained and findings:
            reasons.append(f"no confident finding ({conclusion.reason})")
        return StudyResult(
            study_instance_uid=study_uid,
            images=images,
            algorithms=self.algorithms,
            conclusion=conclusion,
            assessable=assessable,
            needs_review=bool(reasons),
            review_reasons=tuple(dict.fromkeys(reasons)),
        )


def _reason_kind(reason: str) -> str:
    if reason.startswith("QC failed") or reason == "no usable frame":
        return "QC"
    if "out of distribution" in reason:
        return "out of distribution"
    if "below threshold" in reason:
        return "low confidence"
    if "not reportable" in reason:
        return "not reportable"
    if "view uncertain" in reason:
        return "view uncertain"
    return "other"


def _abstain(classification: Classification, reason: str) -> Classification:
    return Classification(
        task=classification.task,
        label=classification.label,
        code=classification.code,
        probability=classification.probability,
        algorithm=classification.algorithm,
        threshold=classification.threshold,
        abstained=True,
        reason=reason,
    )


def _severity(classification: Classification, packs: Sequence[ModelPack]) -> int:
    for pack in packs:
        task = pack.tasks.get(classification.task)
        if task is not None and pack.algorithm == classification.algorithm:
            try:
                return task.label(classification.label).severity
            except KeyError:
                return 0
    return 0


def _most_severe(
    findings: Sequence[Classification], packs: Sequence[ModelPack]
) -> Classification | None:
    """Most severe confident finding (ties: higher probability); else the most probable
    abstained one; ``None`` without findings."""
    confident = [f for f in findings if not f.abstained]
    if confident:
        return max(confident, key=lambda f: (_severity(f, packs), f.probability))
    if findings:
        return max(findings, key=lambda f: f.probability)
    return None


def _locate(
    pack: ModelPack, task: TaskSpec, label: str, prediction: Prediction, item: PreparedInstance
) -> Box | None:
    """Region of ``label`` from the pack's spatial maps averaged over the image's frames;
    ``None`` when the pack has none for ``task``."""
    loc = pack.manifest.localisation
    if loc is None or loc.task != task.name or loc.output not in prediction.maps:
        return None
    heat = prediction.maps[loc.output].mean(axis=0)[task.label_names.index(label)]
    return box_from_map(heat, input_box(item, pack.input.region), fraction=loc.fraction)


def _slice(prediction: Prediction, start: int, stop: int) -> Prediction:
    return Prediction(
        probabilities={k: v[start:stop] for k, v in prediction.probabilities.items()},
        values={k: v[start:stop] for k, v in prediction.values.items()},
        embedding=prediction.embedding[start:stop],
        ood_score=None if prediction.ood_score is None else prediction.ood_score[start:stop],
        maps={k: v[start:stop] for k, v in prediction.maps.items()},
    )
