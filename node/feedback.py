"""Readers' verdicts on AI results, and the labelled cases they make for training.

A verdict names one result the way the SR shows it: the SR's SOP Instance UID, the
Tracking UID of the image's measurement group (:func:`dicom_sr.tracking_uid`) and which
result of the image (``view`` or ``finding``). It is checked against the job that wrote
that SR, so feedback can only be about what the node reported; a corrected label must be
one of the pack's labels for that head. :func:`export_cases` turns agreed and corrected
results into a folder that ``sononode model train --data`` reads (DICOM files and a
``labels.csv`` with one column per head).
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_sr import tracking_uid
from dicom_sr.model import Classification, StudyResult
from node.db import Feedback, FeedbackVerdict, Instance, Job
from node.drift.vendors import scanner_of
from node.spool import Spool

logger = logging.getLogger(__name__)

#: The columns of the exported ``labels.csv`` besides one per head.
CASE_COLUMNS = ("file", "sop_instance_uid", "study_instance_uid", "vendor")


class ResultItem(StrEnum):
    """Which result of an image a verdict is about."""

    VIEW = "view"
    FINDING = "finding"


class FeedbackError(ValueError):
    """The verdict does not fit the result it names (unknown label, missing label)."""


class NoSuchResult(LookupError):
    """No SR, image or result of that kind, as the verdict names it."""


@dataclass(frozen=True)
class Verdict:
    """What a reader sends."""

    sr_sop_instance_uid: str
    tracking_uid: str
    item: ResultItem
    verdict: FeedbackVerdict
    corrected_label: str | None = None
    comment: str | None = None


def _classification(result: StudyResult, wanted_tracking_uid: str,
                    item: ResultItem) -> tuple[str, Classification]:
    for image in result.images:
        if tracking_uid(image.sop_instance_uid) != wanted_tracking_uid:
            continue
        found = image.view if item is ResultItem.VIEW else image.finding
        if found is None:
            raise NoSuchResult(f"the SR reports no {item.value} for image "
                               f"{image.sop_instance_uid}")
        return image.sop_instance_uid, found
    raise NoSuchResult(f"no image of the SR has Tracking UID {wanted_tracking_uid}")


def pack_labels(catalogue: Sequence[Mapping[str, Any]], name: str, version: str,
                task: str) -> list[str] | None:
    """The label names of head ``task`` of the configured pack ``name`` ``version``
    (from ``/models``' catalogue), or ``None`` when no such pack is configured."""
    for pack in catalogue:
        if pack.get("name") == name and pack.get("version") == version:
            head = (pack.get("tasks") or {}).get(task) or {}
            return [str(label["name"]) for label in head.get("labels", [])]
    return None


def record(session: Session, verdict: Verdict, *, actor: str,
           catalogue: Sequence[Mapping[str, Any]]) -> Feedback:
    """Store ``verdict`` on the result it names.

    Raises
    ------
    NoSuchResult
        No SR with that SOP Instance UID, no image with that Tracking UID in it, or no
        result of that kind for the image.
    FeedbackError
        A correction without a label, a label with another verdict, or a label that is not
        one of the pack's for that head (or the pack is no longer configured).
    """
    job = session.scalars(select(Job).where(
        Job.sr_sop_instance_uid == verdict.sr_sop_instance_uid)).first()
    if job is None or job.result is None:
        raise NoSuchResult(f"no SR {verdict.sr_sop_instance_uid} was written by this node")
    result = StudyResult.from_json(job.result)
    sop_uid, found = _classification(result, verdict.tracking_uid, verdict.item)
    corrected = verdict.corrected_label
    if verdict.verdict is FeedbackVerdict.CORRECTED:
        if not corrected:
            raise FeedbackError("a correction needs corrected_label")
        labels = pack_labels(catalogue, found.algorithm.name, found.algorithm.version,
                             found.task)
        if labels is None:
            raise FeedbackError(f"pack {found.algorithm.name} {found.algorithm.version} is "
                                "not configured: its labels cannot be checked")
        if corrected not in labels:
            raise FeedbackError(f"{corrected!r} is not a {found.task} label of "
                                f"{found.algorithm.name} {found.algorithm.version}: "
                                f"one of {', '.join(labels)}")
    elif corrected:
        raise FeedbackError(f"corrected_label goes with verdict 'corrected', not "
                            f"{verdict.verdict.value!r}")
    instance = session.get(Instance, sop_uid)
    vendor = (scanner_of(instance.manufacturer, instance.manufacturer_model_name).vendor
              if instance is not None else "unknown")
    row = Feedback(
        actor=actor[:128], study_instance_uid=job.study_instance_uid, job_id=job.id,
        sr_sop_instance_uid=verdict.sr_sop_instance_uid, tracking_uid=verdict.tracking_uid,
        sop_instance_uid=sop_uid, item=verdict.item.value, task=found.task,
        model=f"{found.algorithm.name} {found.algorithm.version}"[:160], vendor=vendor[:64],
        predicted_label=found.label, predicted_probability=float(found.probability),
        verdict=verdict.verdict, corrected_label=corrected, comment=verdict.comment)
    session.add(row)
    session.flush()
    logger.info("feedback %d: %s on the %s of image %s (study %s)", row.id,
                verdict.verdict.value, verdict.item.value, sop_uid, job.study_instance_uid)
    return row


def counts(session: Session) -> list[tuple[str, str, str, str, int]]:
    """``(model, task, vendor, verdict, count)`` over all feedback (for the metrics)."""
    rows = session.execute(
        select(Feedback.model, Feedback.task, Feedback.vendor, Feedback.verdict, func.count())
        .group_by(Feedback.model, Feedback.task, Feedback.vendor, Feedback.verdict)).all()
    return [(m, t, v, FeedbackVerdict(d).value, int(n)) for m, t, v, d, n in rows]


def confirmed_label(row: Feedback) -> str | None:
    """The label a verdict confirms: the prediction agreed with, the correction, or none."""
    if row.verdict is FeedbackVerdict.AGREE:
        return row.predicted_label
    if row.verdict is FeedbackVerdict.CORRECTED:
        return row.corrected_label
    return None


@dataclass(frozen=True)
class ExportedCases:
    """What :func:`export_cases` wrote."""

    images: int
    labels: int
    missing: tuple[str, ...]
    """SOP Instance UIDs whose pixel data is no longer in the spool (retention)."""


def export_cases(session: Session, spool: Spool, out: Path) -> ExportedCases:
    """Write every image with a confirmed label to ``out``: its DICOM file under
    ``out/images/`` and one row of ``out/labels.csv`` (``file``, ``sop_instance_uid``,
    ``study_instance_uid``, ``vendor`` and one column per head, empty where unknown). The
    latest verdict on a result counts; disagreement without a correction gives no label.
    """
    rows = session.scalars(select(Feedback).order_by(Feedback.id)).all()
    latest: dict[tuple[str, str], Feedback] = {}
    for row in rows:
        latest[(row.sop_instance_uid, row.task)] = row
    by_image: dict[str, dict[str, str]] = {}
    studies: dict[str, tuple[str, str]] = {}
    for (sop_uid, task), row in latest.items():
        label = confirmed_label(row)
        if label is None:
            continue
        by_image.setdefault(sop_uid, {})[task] = label
        studies[sop_uid] = (row.study_instance_uid, row.vendor)
    tasks = sorted({task for labels in by_image.values() for task in labels})
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, str]] = []
    missing: list[str] = []
    for sop_uid, labels in sorted(by_image.items()):
        instance = session.get(Instance, sop_uid)
        source = spool.absolute(instance.path) if instance is not None else None
        if source is None or not source.is_file():
            missing.append(sop_uid)
            continue
        target = images / f"{sop_uid}.dcm"
        shutil.copyfile(source, target)
        study_uid, vendor = studies[sop_uid]
        written.append({"file": f"images/{target.name}", "sop_instance_uid": sop_uid,
                        "study_instance_uid": study_uid, "vendor": vendor,
                        **{task: labels.get(task, "") for task in tasks}})
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CASE_COLUMNS, *tasks])
        writer.writeheader()
        writer.writerows(written)
    if missing:
        logger.warning("feedback export: %d image(s) no longer in the spool", len(missing))
    return ExportedCases(images=len(written),
                         labels=sum(len(by_image[r["sop_instance_uid"]]) for r in written),
                         missing=tuple(missing))
