"""The workers' metrics, in one place: from Celery's signals and from stage outcomes.

Task durations, failures and retries come from Celery's own signals; what the stages did
(results by vendor and model, reports, exports, loaded packs) from the outcome each stage
returns (:data:`workers.pipeline.StageOutcome`), handed over by the tasks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery.signals import task_failure, task_postrun, task_prerun, task_retry

from dicom_sr.model import QCOutcome, StudyResult
from node.db import ExportState
from node.metrics import (
    CONFIDENCE,
    EXPORT_FAILURES,
    EXPORTS,
    IMAGES_ANALYSED,
    MODEL_LOADED,
    PREDICTIONS,
    QC_CHECKS,
    STUDIES_REPORTED,
    TASK_FAILURES,
    TASK_RETRIES,
    TASK_SECONDS,
)
from workers.pipeline import ExportOutcome, Inferred, Reported, StageOutcome

if TYPE_CHECKING:
    from workers.models.packs import ModelPack

_started: dict[str, float] = {}


@task_prerun.connect
def _on_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _on_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    start = _started.pop(task_id or "", None)
    if start is not None and task is not None:
        TASK_SECONDS.labels(task=task.name).observe(time.perf_counter() - start)


@task_failure.connect
def _on_failure(sender: Any = None, **_: Any) -> None:
    TASK_FAILURES.labels(task=getattr(sender, "name", "unknown")).inc()


@task_retry.connect
def _on_retry(sender: Any = None, **_: Any) -> None:
    TASK_RETRIES.labels(task=getattr(sender, "name", "unknown")).inc()


def record_result_metrics(result: StudyResult, vendors: Mapping[str, str]) -> None:
    """Count QC reasons, predictions and confidences of a finished analysis by vendor."""
    for image in result.images:
        vendor = vendors.get(image.sop_instance_uid, "unknown")
        IMAGES_ANALYSED.labels(vendor=vendor, qc_outcome=image.qc_outcome.value).inc()
        for check in image.qc_checks:
            if check.outcome is not QCOutcome.PASS:
                QC_CHECKS.labels(reason=check.code, outcome=check.outcome.value,
                                 vendor=vendor).inc()
        for classification in (image.view, image.finding):
            if classification is None:
                continue
            model = f"{classification.algorithm.name} {classification.algorithm.version}"
            PREDICTIONS.labels(
                model=model, task=classification.task, label=classification.label,
                vendor=vendor, abstained=str(classification.abstained).lower(),
            ).inc()
            CONFIDENCE.labels(model=model, task=classification.task, vendor=vendor).observe(
                classification.probability
            )


def stage_finished(outcome: StageOutcome) -> None:
    """Count what a stage did."""
    if isinstance(outcome, Inferred):
        record_result_metrics(outcome.result, outcome.vendors)
    elif isinstance(outcome, Reported):
        STUDIES_REPORTED.labels(needs_review=str(outcome.needs_review).lower()).inc()
    elif isinstance(outcome, ExportOutcome):
        if outcome.state is ExportState.SENT:
            EXPORTS.labels(destination=outcome.destination, outcome="sent").inc()
        elif outcome.state is ExportState.RETRYING:
            EXPORT_FAILURES.labels(destination=outcome.destination).inc()
            EXPORTS.labels(destination=outcome.destination, outcome="retry").inc()
        elif outcome.state is ExportState.DEAD:
            EXPORTS.labels(destination=outcome.destination, outcome="dead").inc()


def packs_loaded(packs: Sequence[ModelPack]) -> None:
    """Mark the model packs this worker process serves (and on which device)."""
    for pack in packs:
        MODEL_LOADED.labels(model=pack.algorithm.name, version=pack.algorithm.version,
                            device=str(pack.device)).set(1)
