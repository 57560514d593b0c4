"""Metrics updated from Celery signals and from finished results, in one place."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery.signals import task_failure, task_postrun, task_prerun, task_retry

from dicom_sr.model import QCOutcome, StudyResult
from node.metrics import (
    CONFIDENCE,
    IMAGES_ANALYSED,
    PREDICTIONS,
    QC_CHECKS,
    TASK_FAILURES,
    TASK_RETRIES,
    TASK_SECONDS,
)

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
            model = classification.algorithm.name
            PREDICTIONS.labels(
                model=model, task=classification.task, label=classification.label,
                vendor=vendor, abstained=str(classification.abstained).lower(),
            ).inc()
            CONFIDENCE.labels(model=model, task=classification.task, vendor=vendor).observe(
                classification.probability
            )
