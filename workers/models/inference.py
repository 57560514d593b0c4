"""Study-level inference: frames of every usable image through every pack, then decisions.

:class:`Analyser` is built once per worker process with the loaded packs. For one study it

1. samples at most ``max_frames`` usable frames per image (evenly over a cine loop),
2. crops each frame to the pack's region as training did
   (:func:`workers.models.preprocess.model_input`: QC's scan region, outside of the sector
   masked with QC's own mask),
3. runs all frames of the study through each pack in batches of ``batch_size``,
4. averages calibrated probabilities over the frames of each image (cine loop),
5. decides view and finding per image with abstention (confidence floor, abstain labels,
   out-of-distribution input, failed QC) and review flags,
6. localises the view in the frame when the pack has spatial maps (``localisation`` in the
   manifest, e.g. SonoNet's class maps; :func:`box_from_map`), else reports QC's scan region,
7. concludes the study with the most severe confident finding.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from workers.imaging.pixels import sample_frames
from workers.imaging.types import Box
from workers.models.manifest import TaskKind, TaskRole, TaskSpec
from workers.models.packs import Prediction
from workers.models.preprocess import input_box, model_input

if TYPE_CHECKING:
    from workers.imaging.types import PreparedInstance
    from workers.models.packs import ModelPack

logger = logging.getLogger(__name__)


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


#: Frames of an image whose statistics are measured for the image-statistics OOD score.
IMAGE_STATISTICS_FRAMES = 4


@dataclass(frozen=True)
class PackOutputs:
    """What one pack made of one image, for drift monitoring (the SR reports decisions).

    ``labels`` and ``confidence`` hold, per classification head that applies to the image
    (a finding head only for the views it is for), the most probable label and its
    calibrated probability averaged over the image's frames; ``embedding`` is the mean of
    the frames' embeddings.
    """

    labels: dict[str, str]
    confidence: dict[str, float]
    ood_score: float | None
    out_of_distribution: bool
    embedding: np.ndarray
    severe: dict[str, float] = field(default_factory=dict)
    """Per finding head that applies and has one most severe label (severity > 0), that
    label's calibrated probability averaged over the frames: what a change of prevalence
    moves first."""


@dataclass(frozen=True)
class Analysis:
    """A study's result and, per pack (in the analyser's order) and per image (in the
    result's order), the pack's outputs (``None``: the pack saw no frame of it)."""

    result: StudyResult
    outputs: tuple[tuple[PackOutputs | None, ...], ...]


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

    @property
    def algorithms(self) -> tuple[AlgorithmInfo, ...]:
        return tuple(pack.algorithm for pack in self.packs)

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
            return _Decision(label, probability, True,
                             f"{_title(task.name)}: '{label}' is not a reportable result")
        if not positive and probability < floor:
            return _Decision(
                label,
                probability,
                True,
                f"{_title(task.name)} not confident: {probability:.1%} is below the "
                f"{floor:.1%} threshold",
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
        return self.analyse_study_monitored(
            study_uid, prepared, assessable=assessable, study_checks=study_checks
        ).result

    def analyse_study_monitored(
        self,
        study_uid: str,
        prepared: Sequence[PreparedInstance],
        *,
        assessable: bool = True,
        study_checks: Sequence[QCCheck] = (),
    ) -> Analysis:
        """:meth:`analyse_study`, with each pack's outputs for drift monitoring."""
        selected: list[list[int]] = []
        for item in prepared:
            usable = [] if item.qc.failed else list(item.qc.usable_frames)
            usable = [i for i in usable if 0 <= i < item.instance.frames.shape[0]]
            selected.append(sample_frames(usable, self.max_frames))

        per_pack: list[list[Prediction | None]] = []
        per_pack_scores: list[list[float | None]] = []
        for pack in self.packs:
            crops = [
                model_input(item, index, pack.input.region, pack.input.layouts)
                for item, frames in zip(prepared, selected, strict=True)
                for index in frames
            ]
            prediction = pack.predict(crops, batch_size=self.batch_size) if crops else None
            per_image: list[Prediction | None] = []
            scores: list[float | None] = []
            start = 0
            for frames in selected:
                if not frames or prediction is None:
                    per_image.append(None)
                    scores.append(None)
                    continue
                per_image.append(_slice(prediction, start, start + len(frames)))
                # The image's grey levels and texture: the mean over a few of its frames
                # (a loop's frames look alike, and each frame costs about 7 ms).
                picked = sample_frames(list(range(len(frames))), IMAGE_STATISTICS_FRAMES)
                views = pack.predicted_views(
                    {k: v[[start + i for i in picked]] for k, v in
                     prediction.probabilities.items()})
                got = pack.image_ood_scores([crops[start + i] for i in picked], views)
                scores.append(None if got is None else float(np.mean(got)))
                start += len(frames)
            per_pack.append(per_image)
            per_pack_scores.append(scores)

        images = tuple(
            self._image_result(item, frames, [preds[i] for preds in per_pack],
                               [scores[i] for scores in per_pack_scores])
            for i, (item, frames) in enumerate(zip(prepared, selected, strict=True))
        )
        outputs = tuple(
            tuple(_outputs(pack, p, score) for p, score in zip(preds, scores, strict=True))
            for pack, preds, scores in zip(self.packs, per_pack, per_pack_scores, strict=True)
        )
        return Analysis(self._study_result(study_uid, images, assessable, study_checks), outputs)

    def _image_result(
        self,
        item: PreparedInstance,
        frames: list[int],
        predictions: list[Prediction | None],
        image_scores: list[float | None],
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
        key_frame: int | None = None
        findings: list[Classification] = []
        quality: float | None = None
        ood_score: float | None = None
        ood = False
        for pack, prediction, image_score in zip(self.packs, predictions, image_scores,
                                                 strict=True):
            if prediction is None:
                continue
            pack_ood_reason = None
            spec = pack.manifest.ood
            if prediction.ood_score is not None and spec is not None:
                score = float(np.mean(prediction.ood_score))
                if ood_score is None:
                    ood_score = score
                if score > spec.threshold:
                    pack_ood_reason = (
                        f"input out of distribution: unlike the images {pack.name} was "
                        f"trained on ({spec.method.value} score {score:.2f}, "
                        f"threshold {spec.threshold:.2f})"
                    )
            if (pack_ood_reason is None and image_score is not None and spec is not None
                    and spec.image is not None and image_score > spec.image.threshold):
                pack_ood_reason = (
                    f"input out of distribution: grey levels and texture unlike the images "
                    f"{pack.name} was trained on (image statistics distance "
                    f"{image_score:.2f}, threshold {spec.image.threshold:.2f})"
                )
            if pack_ood_reason is not None:
                ood = True
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
                    if inst.number_of_frames > 1 and inst.frame_indices:
                        # The loop's frame most confident of the reported view.
                        column = view_task.label_names.index(view.label)
                        best = int(np.argmax(prediction.probabilities[view_task.name][:, column]))
                        key_frame = int(inst.frame_indices[frames[best]]) + 1
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
                                reason=pack_ood_reason
                                or f"{_title(task.name)} not assessed: the view is uncertain",
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
            base["region_localised"] = True
        return ImageResult(
            **base,  # type: ignore[arg-type]
            view=view,
            finding=finding,
            quality_score=quality,
            ood_score=ood_score,
            out_of_distribution=ood,
            key_frame=key_frame,
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


def _outputs(pack: ModelPack, prediction: Prediction | None,
             image_score: float | None = None) -> PackOutputs | None:
    if prediction is None:
        return None
    labels: dict[str, str] = {}
    confidence: dict[str, float] = {}
    severe: dict[str, float] = {}
    view_label: str | None = None
    heads = [t for t in pack.tasks.values() if t.kind is TaskKind.CLASSIFICATION]
    # The view first: finding heads apply to the views they are for.
    heads.sort(key=lambda t: t.role is not TaskRole.VIEW)
    for task in heads:
        mean = prediction.probabilities[task.name].mean(axis=0)
        best = int(np.argmax(mean))
        label = task.label_names[best]
        if task.role is TaskRole.VIEW:
            view_label = label
        elif task.applies_to is not None and view_label not in task.applies_to:
            continue
        labels[task.name] = label
        confidence[task.name] = float(mean[best])
        severities = [lab.severity for lab in task.labels]
        top = max(severities)
        if task.role is TaskRole.FINDING and top > 0 and severities.count(top) == 1:
            severe[task.name] = float(mean[severities.index(top)])
    score = None if prediction.ood_score is None else float(np.mean(prediction.ood_score))
    spec = pack.manifest.ood
    flagged = bool(spec is not None and (
        (score is not None and score > spec.threshold)
        or (image_score is not None and spec.image is not None
            and image_score > spec.image.threshold)))
    embedding = np.asarray(prediction.embedding, np.float64)
    return PackOutputs(labels, confidence, score, flagged,
                       embedding.reshape(embedding.shape[0], -1).mean(axis=0), severe)


def _title(task: str) -> str:
    return task.replace("_", " ").capitalize()


def _reason_kind(reason: str) -> str:
    if reason.startswith("QC failed") or reason == "no usable frame":
        return "QC"
    if "out of distribution" in reason:
        return "out of distribution"
    if "not confident" in reason:
        return "low confidence"
    if "not reportable" in reason:
        return "not reportable"
    if "view is uncertain" in reason:
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
    return box_from_map(heat, input_box(item, pack.input.region, pack.input.layouts),
                        fraction=loc.fraction)


def _slice(prediction: Prediction, start: int, stop: int) -> Prediction:
    return Prediction(
        probabilities={k: v[start:stop] for k, v in prediction.probabilities.items()},
        values={k: v[start:stop] for k, v in prediction.values.items()},
        embedding=prediction.embedding[start:stop],
        ood_score=None if prediction.ood_score is None else prediction.ood_score[start:stop],
        maps={k: v[start:stop] for k, v in prediction.maps.items()},
    )
