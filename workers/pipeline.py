"""The stages of one analysis job, as plain functions over the index and the spool.

Celery tasks (:mod:`workers.tasks`) are thin wrappers around these. Every stage is
idempotent: it looks at the job's state in the database and does nothing when its
work is already recorded, so a redelivered or reconciled message is harmless.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import delete, select, update

from dicom_sr.model import QCCheck, QCOutcome, StudyResult, study_result_from_dict, to_dict
from node.db import (
    Database,
    Export,
    ExportState,
    ImageResultRow,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    settle_job,
    utcnow,
)
from node.sop_classes import is_analysed
from node.spool import Spool, fsync_dir, safe_component
from workers.imaging import DecodedInstance, InstanceQC, PreparedInstance

if TYPE_CHECKING:
    from node.config import Settings
    from workers.models.inference import Analyser

logger = logging.getLogger(__name__)

_ORDER = [JobState.QUEUED, JobState.QC_DONE, JobState.INFERRED, JobState.REPORTED, JobState.DONE]


class JobGone(Exception):
    """The job does not exist (deleted) or failed for good: the stage does nothing."""


def _reached(job: Job, state: JobState) -> bool:
    if job.state == JobState.FAILED:
        raise JobGone(f"job {job.id} has failed")
    return _ORDER.index(JobState(job.state)) >= _ORDER.index(state)


@dataclass
class WorkerContext:
    """Per-process collaborators of the stages (built once per worker process)."""

    settings: Settings
    db: Database
    spool: Spool
    _analyser: Analyser | None = field(default=None, repr=False)

    def analyser(self) -> Analyser:
        """The model packs, loaded once per process on first use."""
        if self._analyser is None:
            from workers.models.inference import Analyser
            from workers.models.packs import ModelPack

            packs = [
                ModelPack.load(Path(p), device=self.settings.device)
                for p in self.settings.effective_model_packs
            ]
            if not packs:
                raise RuntimeError(
                    "no model pack configured: set SONONODE_MODEL_PACKS or install the bundled "
                    "packs under deploy/models"
                )
            self._analyser = Analyser(
                packs,
                batch_size=self.settings.inference_batch_size,
                max_frames=self.settings.max_frames_per_loop,
                review_confidence=self.settings.review_confidence,
            )
            from node.metrics import MODEL_LOADED

            for pack in packs:
                MODEL_LOADED.labels(
                    model=pack.algorithm.name, version=pack.algorithm.version,
                    device=str(pack.device),
                ).set(1)
        return self._analyser


def _claim(session: Any, job_id: int, from_state: JobState, to_state: JobState) -> bool:
    """Move the job from ``from_state`` to ``to_state`` if nobody else did; True if we did.

    A conditional UPDATE, issued as the first statement of its transaction, so that two
    copies of one stage (a redelivery beside a reconciler re-dispatch) cannot both record
    their work: SQLite serialises the writers, PostgreSQL locks the row.
    """
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == from_state.value)
        .values(state=to_state.value, updated_at=utcnow())
    ).rowcount
    return bool(claimed)


def _load_job(session: Any, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobGone(f"job {job_id} does not exist")
    return job


def _record_stage(job: Job, stage: str, seconds: float) -> None:
    timings = dict(job.stage_seconds or {})
    timings[stage] = round(seconds, 4)
    job.stage_seconds = timings


def _analysed_instances(session: Any, study_uid: str) -> list[Instance]:
    rows = session.scalars(
        select(Instance)
        .where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.series_number, Instance.instance_number, Instance.received_at)
    ).all()
    return [row for row in rows if is_analysed(row.sop_class_uid, row.modality)]


# --------------------------------------------------------------------------------------
# QC
# --------------------------------------------------------------------------------------
def _qc_to_json(instance: DecodedInstance | None, qc: InstanceQC, frames_total: int) -> dict:
    return {
        "outcome": qc.outcome.value,
        "checks": [
            {"code": c.code, "outcome": c.outcome.value, "message": c.message,
             "value": c.value, "threshold": c.threshold}
            for c in qc.checks
        ],
        # Frame indices within the instance (not within the decoded sample).
        "usable_frame_indices": (
            [int(instance.frame_indices[i]) for i in qc.usable_frames] if instance else []
        ),
        "scan_region": list(qc.scan_region) if qc.scan_region else None,
        "colour_fraction": float(qc.colour_fraction),
        "stats": {k: float(v) for k, v in qc.stats.items()},
        "frames_total": frames_total,
    }


def _checks_from_json(items: list[dict]) -> tuple[QCCheck, ...]:
    return tuple(
        QCCheck(code=c["code"], outcome=QCOutcome(c["outcome"]), message=c["message"],
                value=c.get("value"), threshold=c.get("threshold"))
        for c in items
    )


def _decode_failure(instance: Instance, exc: Exception) -> InstanceQC:
    code = str(getattr(exc, "code", None) or getattr(exc, "reason", None) or "undecodable")
    return InstanceQC(
        outcome=QCOutcome.FAIL,
        checks=(QCCheck(code=code, outcome=QCOutcome.FAIL, message=str(exc)),),
        usable_frames=(),
    )


def run_qc(ctx: WorkerContext, job_id: int) -> None:
    """Decode every analysed instance of the job's study and record its QC outcome."""
    from workers.pixels import PixelDataError, load_instance
    from workers.qc import assess_instance, assess_study

    started = time.perf_counter()
    with ctx.db.session() as session:
        job = _load_job(session, job_id)
        if _reached(job, JobState.QC_DONE):
            return
        instances = _analysed_instances(session, job.study_instance_uid)
        paths = [(row, ctx.spool.absolute(row.path)) for row in instances]

    per_instance: dict[str, dict] = {}
    prepared: list[PreparedInstance] = []
    for row, path in paths:
        try:
            decoded = load_instance(path, max_frames=ctx.settings.max_frames_per_loop)
        except PixelDataError as exc:
            logger.warning("job %d: %s cannot be decoded: %s", job_id, row.sop_instance_uid, exc)
            qc = _decode_failure(row, exc)
            per_instance[row.sop_instance_uid] = _qc_to_json(None, qc, row.number_of_frames)
            prepared.append(PreparedInstance(_placeholder(row), qc))
            continue
        qc = assess_instance(decoded)
        per_instance[row.sop_instance_uid] = _qc_to_json(decoded, qc, decoded.number_of_frames)
        # Keep only what the study-level assessment needs (no pixels held across the loop).
        prepared.append(PreparedInstance(_strip(decoded), qc))
    assessable, study_checks = assess_study(prepared)

    with ctx.db.session() as session:
        if not _claim(session, job_id, JobState.QUEUED, JobState.QC_DONE):
            return
        job = _load_job(session, job_id)
        job.qc = {
            "instances": per_instance,
            "assessable": bool(assessable),
            "study_checks": [
                {"code": c.code, "outcome": c.outcome.value, "message": c.message,
                 "value": c.value, "threshold": c.threshold}
                for c in study_checks
            ],
        }
        _record_stage(job, "qc", time.perf_counter() - started)
    logger.info("job %d: QC of %d instance(s) done (assessable=%s)", job_id, len(paths),
                assessable)


def _placeholder(row: Instance) -> DecodedInstance:
    """A pixel-less stand-in for an instance that could not be decoded."""
    return DecodedInstance(
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        modality=row.modality or "",
        manufacturer=row.manufacturer or "",
        manufacturer_model_name=row.manufacturer_model_name or "",
        photometric_interpretation=row.photometric_interpretation or "",
        number_of_frames=row.number_of_frames,
        frame_indices=(),
        frames=np.zeros((0, 1, 1, 3), dtype=np.uint8),
    )


def _strip(decoded: DecodedInstance) -> DecodedInstance:
    from dataclasses import replace

    return replace(decoded, frames=np.zeros((0, 1, 1, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------
def run_inference(ctx: WorkerContext, job_id: int) -> None:
    """Run the model packs on the usable frames of the study and record the result."""
    from workers.pixels import PixelDataError, load_instance

    started = time.perf_counter()
    with ctx.db.session() as session:
        job = _load_job(session, job_id)
        if _reached(job, JobState.INFERRED):
            return
        if job.qc is None:
            raise RuntimeError(f"job {job_id} reached inference without QC results")
        qc_json = job.qc
        study_uid = job.study_instance_uid
        rows = {r.sop_instance_uid: r for r in _analysed_instances(session, study_uid)}

    prepared: list[PreparedInstance] = []
    for sop_uid, entry in qc_json["instances"].items():
        row = rows.get(sop_uid)
        if row is None:
            continue
        checks = _checks_from_json(entry["checks"])
        usable = entry["usable_frame_indices"]
        decoded: DecodedInstance | None = None
        if usable:
            try:
                decoded = load_instance(
                    ctx.spool.absolute(row.path), max_frames=ctx.settings.max_frames_per_loop
                )
            except PixelDataError as exc:
                logger.warning("job %d: %s no longer decodes: %s", job_id, sop_uid, exc)
        if decoded is None:
            prepared.append(
                PreparedInstance(
                    _placeholder(row),
                    InstanceQC(outcome=QCOutcome(entry["outcome"]), checks=checks,
                               usable_frames=()),
                )
            )
            continue
        position = {int(f): i for i, f in enumerate(decoded.frame_indices)}
        region = entry.get("scan_region")
        prepared.append(
            PreparedInstance(
                decoded,
                InstanceQC(
                    outcome=QCOutcome(entry["outcome"]),
                    checks=checks,
                    usable_frames=tuple(position[f] for f in usable if f in position),
                    scan_region=tuple(region) if region else None,  # type: ignore[arg-type]
                    colour_fraction=float(entry.get("colour_fraction", 0.0)),
                    stats=dict(entry.get("stats", {})),
                ),
            )
        )

    result = ctx.analyser().analyse_study(
        study_uid,
        prepared,
        assessable=bool(qc_json.get("assessable", True)),
        study_checks=_checks_from_json(qc_json.get("study_checks", [])),
    )
    vendors = {p.instance.sop_instance_uid: p.instance.manufacturer or "unknown" for p in prepared}
    stats = {p.instance.sop_instance_uid: p.qc.stats for p in prepared}
    del prepared

    with ctx.db.session() as session:
        if not _claim(session, job_id, JobState.QC_DONE, JobState.INFERRED):
            return
        job = _load_job(session, job_id)
        job.result = to_dict(result)
        _record_stage(job, "inference", time.perf_counter() - started)
        # A re-analysis replaces the rows of the same images: drift counts each image once.
        session.execute(
            delete(ImageResultRow).where(
                ImageResultRow.sop_instance_uid.in_([i.sop_instance_uid for i in result.images]),
                ImageResultRow.job_id != job_id,
            )
        )
        model_names = ", ".join(a.name for a in result.algorithms)
        for image in result.images:
            image_stats = stats.get(image.sop_instance_uid, {})
            session.add(
                ImageResultRow(
                    job_id=job_id,
                    sop_instance_uid=image.sop_instance_uid,
                    manufacturer=vendors.get(image.sop_instance_uid, "unknown"),
                    model_name=model_names[:128],
                    qc_outcome=image.qc_outcome.value,
                    view_label=image.view.label if image.view else None,
                    view_probability=image.view.probability if image.view else None,
                    finding_label=image.finding.label if image.finding else None,
                    finding_probability=image.finding.probability if image.finding else None,
                    ood_score=image.ood_score,
                    needs_review=image.needs_review,
                    mean_intensity=image_stats.get("mean"),
                    std_intensity=image_stats.get("std"),
                )
            )
    from workers.signals import record_result_metrics

    record_result_metrics(result, vendors)
    logger.info("job %d: inference done (%d images, needs_review=%s)", job_id,
                len(result.images), result.needs_review)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def run_report(ctx: WorkerContext, job_id: int) -> list[int]:
    """Build the SR for the job, store it durably, and create one export per destination.

    Returns the ids of the exports to dispatch.
    """
    from dicom_sr.builder import build_sr

    started = time.perf_counter()
    with ctx.db.session() as session:
        job = _load_job(session, job_id)
        if _reached(job, JobState.REPORTED):
            return [e.id for e in job.exports if e.state in (ExportState.PENDING,)]
        if job.result is None:
            raise RuntimeError(f"job {job_id} reached reporting without a result")
        result: StudyResult = study_result_from_dict(job.result)
        study = session.get(Study, job.study_instance_uid, with_for_update=True)
        assert study is not None
        if study.sr_series_instance_uid is None:
            study.sr_series_instance_uid = generate_uid()
        series_uid = study.sr_series_instance_uid
        referenced = {image.sop_instance_uid for image in result.images}
        source_paths = [
            ctx.spool.absolute(row.path)
            for row in _analysed_instances(session, job.study_instance_uid)
            if row.sop_instance_uid in referenced
        ]
        previous = session.scalars(
            select(Job)
            .where(Job.study_instance_uid == job.study_instance_uid, Job.id < job.id,
                   Job.sr_path.is_not(None))
            .order_by(Job.id.desc())
        ).first()
        previous_path = Path(previous.sr_path) if previous and previous.sr_path else None
        instance_number = 1 + sum(
            1 for j in study.jobs if j.sr_sop_instance_uid is not None and j.id != job.id
        )

    sources = [dcmread(p, stop_before_pixels=True) for p in source_paths]
    previous_versions = (
        [dcmread(previous_path)] if previous_path and previous_path.exists() else None
    )
    sop_uid = generate_uid()
    sr = build_sr(
        sources,
        result,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        previous_versions=previous_versions,
    )
    out_dir = ctx.settings.reports_dir / safe_component(result.study_instance_uid)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{sop_uid}.dcm"
    temp = out_dir / f".{sop_uid}.tmp"
    sr.save_as(temp, enforce_file_format=True)
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    fsync_dir(out_dir)

    with ctx.db.session() as session:
        target = JobState.REPORTED if ctx.settings.destinations else JobState.DONE
        if not _claim(session, job_id, JobState.INFERRED, target):
            final.unlink(missing_ok=True)  # another copy of this stage reported first
            return []
        job = _load_job(session, job_id)
        job.sr_sop_instance_uid = sop_uid
        job.sr_path = str(final.resolve())
        job.updated_at = utcnow()
        _record_stage(job, "report", time.perf_counter() - started)
        study = session.get(Study, job.study_instance_uid)
        assert study is not None
        exports = [
            Export(job_id=job.id, study_instance_uid=job.study_instance_uid,
                   destination=str(dest), state=ExportState.PENDING)
            for dest in ctx.settings.destinations
        ]
        session.add_all(exports)
        if exports:
            study.state = StudyState.REPORTED
        elif study.revision <= job.revision:
            study.state = StudyState.EXPORTED
        session.flush()
        export_ids = [e.id for e in exports]
    from node.metrics import STUDIES_REPORTED

    STUDIES_REPORTED.labels(needs_review=str(result.needs_review).lower()).inc()
    logger.info("job %d: SR %s written (%d destination(s))", job_id, sop_uid, len(export_ids))
    return export_ids


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
def pending_exports(ctx: WorkerContext, job_id: int) -> list[int]:
    """Ids of the job's exports that still have to be sent."""
    with ctx.db.session() as session:
        job = _load_job(session, job_id)
        return [e.id for e in job.exports if e.state in (ExportState.PENDING,
                                                         ExportState.RETRYING)]


def run_export(ctx: WorkerContext, export_id: int) -> bool:
    """Send one SR to one destination. Returns False when there was nothing to do.

    Raises :class:`workers.export.ExportTransientError` for the caller to retry and
    :class:`workers.export.ExportRefusedError` for a permanent refusal.
    """
    from node.config import parse_destination
    from workers.export import send_file

    with ctx.db.session() as session:
        export = session.get(Export, export_id)
        if export is None or export.state in (ExportState.SENT, ExportState.DEAD):
            return False
        job = _load_job(session, export.job_id)
        if job.sr_path is None:
            raise RuntimeError(f"export {export_id}: job {job.id} has no SR")
        sr_path = Path(job.sr_path)
        destination = parse_destination(export.destination)
        export.attempts += 1
        export.updated_at = utcnow()

    send_file(sr_path, destination, calling_ae_title=ctx.settings.ae_title,
              timeout_seconds=ctx.settings.network_timeout_seconds)

    with ctx.db.session() as session:
        export = session.get(Export, export_id)
        assert export is not None
        export.state = ExportState.SENT
        export.sent_at = utcnow()
        export.updated_at = utcnow()
        export.last_error = None
        settle_job(session, export.job_id)
    return True


def mark_export(ctx: WorkerContext, export_id: int, state: ExportState, error: str) -> None:
    """Record a failed attempt (``RETRYING``) or the dead letter (``DEAD``)."""
    with ctx.db.session() as session:
        export = session.get(Export, export_id)
        if export is None or export.state == ExportState.SENT:
            return
        export.state = state
        export.last_error = error[:2000]
        export.updated_at = utcnow()
        settle_job(session, export.job_id)


def fail_job(ctx: WorkerContext, job_id: int, error: str) -> None:
    """Mark the job (and its study) as failed for good."""
    with ctx.db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state in (JobState.DONE,):
            return
        job.state = JobState.FAILED
        job.error = error[:4000]
        job.updated_at = utcnow()
        study = session.get(Study, job.study_instance_uid)
        if study is not None and study.state == StudyState.PROCESSING:
            study.state = StudyState.FAILED
