"""The stages of one analysis job: load rows, call one function with typed inputs, record.

Each stage (:func:`run_qc`, :func:`run_inference`, :func:`run_report`, :func:`run_export`)

1. asks :mod:`node.jobs` whether its work is still to do (a redelivered or reconciled
   message finds it done and does nothing) and reads what it needs from the index;
2. calls one function with typed inputs and no database: :func:`assess` (QC),
   :func:`analyse` (the model packs), :func:`dicom_sr.builder.build_sr` (the report),
   :func:`workers.export.send_files` (the export);
3. records its typed output through :mod:`node.jobs` (a conditional state change: of two
   copies of a stage, one records) and writes files through :mod:`node.spool`;
4. returns an outcome dataclass, from which :mod:`workers.signals` updates the metrics.

The Celery tasks (:mod:`workers.tasks`) only pick the stage and run it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dicom_sr.builder import build_sr, is_analysed
from dicom_sr.model import QCCheck, QCOutcome, StudyResult
from dicom_sr.summary import build_key_objects, build_summary_image
from node import drift, jobs
from node.config import parse_destination
from node.db import Database, ExportState, Instance, JobState
from node.drift.monitor import StreamStatus
from node.drift.vendors import scanner_of
from node.index import analysed_instances
from node.installation import installation_uid
from node.spool import Spool, safe_component, write_durably
from node.storage import InstanceStore, open_store
from node.tls import client_context
from workers.drift import study_signals
from workers.export import send_files
from workers.imaging.pixels import PixelDataError, load_instance
from workers.imaging.qc import assess_instance, assess_study
from workers.imaging.types import (
    NO_FRAMES,
    DecodedInstance,
    InstanceQC,
    PreparedInstance,
    QCRecord,
    StudyQC,
)

if TYPE_CHECKING:
    from node.config import Settings
    from workers.models.inference import Analyser, Analysis
    from workers.models.packs import ModelPack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceImage:
    """An analysed instance of the study as the index knows it: its header and its file."""

    header: DecodedInstance
    """Identifying header fields, no pixels."""
    path: Path
    """The spooled file (read by the stages that run beside the spool)."""
    relative: str = ""
    """Its spool-relative path: its name in an :class:`node.storage.InstanceStore`."""

    @classmethod
    def from_row(cls, row: Instance, spool: Spool) -> SourceImage:
        header = DecodedInstance(
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
            frames=NO_FRAMES,
        )
        return cls(header, spool.absolute(row.path), row.path)

    @property
    def vendor(self) -> str:
        return self.header.manufacturer or "unknown"

    def evidence_header(self) -> Dataset:
        """The file's header for the report (patient, study and identity), without pixels.

        A header that no longer parses is replaced by the identity the index holds (the
        UIDs the listener validated): the image is still referenced by the report.
        """
        try:
            header: Dataset = dcmread(self.path, stop_before_pixels=True)
        except Exception:
            logger.warning("header of %s unreadable; the report references it by its "
                           "indexed UIDs", self.header.sop_instance_uid)
            header = Dataset()
        header.SOPInstanceUID = self.header.sop_instance_uid
        header.SOPClassUID = self.header.sop_class_uid
        header.StudyInstanceUID = self.header.study_instance_uid
        header.SeriesInstanceUID = self.header.series_instance_uid
        return header


# ----------------------------------------------------------------------------------------
# Outcomes (what the metrics read)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QCDone:
    """QC of a job's study was recorded."""

    job_id: int
    qc: StudyQC


@dataclass(frozen=True)
class Inferred:
    """The study result of a job was recorded."""

    job_id: int
    result: StudyResult
    vendors: Mapping[str, str]
    """Normalised vendor (:func:`node.drift.vendors.scanner_of`) of each image, by SOP
    Instance UID: the ``vendor`` label of the metrics."""


@dataclass(frozen=True)
class Reported:
    """The SR of a job is durable and its exports exist."""

    job_id: int
    sop_instance_uid: str
    needs_review: bool
    export_ids: tuple[int, ...]


@dataclass(frozen=True)
class ExportOutcome:
    """One attempt to deliver an SR."""

    export_id: int
    destination: str
    state: ExportState
    error: str | None = None


StageOutcome = QCDone | Inferred | Reported | ExportOutcome


# ----------------------------------------------------------------------------------------
# Collaborators
# ----------------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """Per-process collaborators of the stages (built once per worker process)."""

    settings: Settings
    db: Database
    spool: Spool
    on_packs_loaded: Callable[[Sequence[ModelPack]], None] = field(default=lambda packs: None)
    store: InstanceStore | None = None
    """Where inference reads instances (default: :func:`node.storage.open_store`)."""
    _analyser: Analyser | None = field(default=None, repr=False)

    def instance_store(self) -> InstanceStore:
        """The store the settings name, opened once."""
        if self.store is None:
            self.store = open_store(self.settings, self.spool)
        return self.store

    def analyser(self) -> Analyser:
        """The model packs, loaded once per process on first use."""
        if self._analyser is None:
            # Imported here, not at the top: workers of the CPU queue (QC, reports,
            # exports) never load torch.
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
            self.on_packs_loaded(packs)
        return self._analyser

    def sources(self, study_uid: str) -> list[SourceImage]:
        """The analysed instances of the study (call inside nothing: opens its session)."""
        with self.db.session() as session:
            return [SourceImage.from_row(row, self.spool)
                    for row in analysed_instances(session, study_uid)]


# ----------------------------------------------------------------------------------------
# QC
# ----------------------------------------------------------------------------------------
#: QC reason code of an instance whose QC itself failed (a defect of the node, not the image).
QC_ERROR = "qc_error"


def unassessable(code: str, message: str) -> InstanceQC:
    """QC's outcome for an instance that cannot be assessed: failed, nothing usable."""
    return InstanceQC(
        outcome=QCOutcome.FAIL,
        checks=(QCCheck(code=code, outcome=QCOutcome.FAIL, message=message),),
        usable_frames=(),
    )


#: Decoded frames QC hands to inference in the same process (:func:`run_analysis`), at
#: most this many bytes per study; the instances beyond are decoded again by inference.
KEEP_DECODED_BYTES = 512 * 1024 * 1024


def _assess_one(source: SourceImage, max_frames: int
                ) -> tuple[DecodedInstance | None, InstanceQC]:
    """Decode one source and run QC on it; a failure is the outcome, never raised."""
    uid = source.header.sop_instance_uid
    try:
        decoded = load_instance(source.path, max_frames=max_frames)
        return decoded, assess_instance(decoded)
    except PixelDataError as exc:
        logger.warning("%s cannot be decoded: %s", uid, exc.reason.value)
        return None, unassessable(exc.reason.value, str(exc))
    except Exception as exc:
        logger.exception("QC of %s failed; reported as not assessable", uid)
        return None, unassessable(QC_ERROR, f"quality control failed ({type(exc).__name__})")


def _assessed(sources: Sequence[SourceImage], max_frames: int, threads: int
              ) -> Iterator[tuple[SourceImage, DecodedInstance | None, InstanceQC]]:
    """Each source with its decoded frames and QC, in order, ``threads`` at a time.

    At most ``threads`` instances are in work beyond the one handed out, so the decoded
    frames held at once stay bounded however long the study.
    """
    if threads <= 1 or len(sources) <= 1:
        for source in sources:
            yield (source, *_assess_one(source, max_frames))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qc") as pool:
        pending: deque[tuple[SourceImage, Future[tuple[DecodedInstance | None, InstanceQC]]]]
        pending = deque()
        for source in sources:
            pending.append((source, pool.submit(_assess_one, source, max_frames)))
            if len(pending) > threads:
                first, future = pending.popleft()
                yield (first, *future.result())
        while pending:
            first, future = pending.popleft()
            yield (first, *future.result())


def assess(sources: Sequence[SourceImage], *, max_frames: int,
           keep: dict[str, DecodedInstance] | None = None, threads: int = 1) -> StudyQC:
    """Decode every source and run QC on it (``threads`` instances at once), then the
    study-level checks.

    An instance that cannot be decoded or assessed is recorded as failed with the reason;
    it never stops the others from being assessed. With ``keep``, the decoded instances
    are put in it (by SOP Instance UID, up to :data:`KEEP_DECODED_BYTES`) for inference.
    """
    kept = 0
    records: dict[str, QCRecord] = {}
    prepared: list[PreparedInstance] = []
    for source, decoded, qc in _assessed(sources, max_frames, threads):
        uid = source.header.sop_instance_uid
        if decoded is None:
            records[uid] = QCRecord.of(qc, None, frames_total=source.header.number_of_frames)
            prepared.append(PreparedInstance(source.header, qc))
            continue
        records[uid] = QCRecord.of(qc, decoded, frames_total=decoded.number_of_frames)
        fits = kept + decoded.frames.nbytes <= KEEP_DECODED_BYTES
        if keep is not None and qc.usable_frames and fits:
            keep[uid] = decoded
            kept += decoded.frames.nbytes
        # Only what the study-level assessment needs: no pixels held across the loop.
        prepared.append(PreparedInstance(decoded.without_pixels(), qc))
    assessable, study_checks = assess_study(prepared)
    return StudyQC(records, assessable=bool(assessable), study_checks=study_checks)


def upload_for_inference(store: InstanceStore, sources: Sequence[SourceImage],
                         study_qc: StudyQC) -> int:
    """Upload to a remote ``store`` the instances inference will read (those with usable
    frames); the number uploaded (already there: not counted). Raises
    :class:`node.storage.StorageError`."""
    if not store.remote:
        return 0
    started, uploaded, size = time.perf_counter(), 0, 0
    for source in sources:
        record = study_qc.instances.get(source.header.sop_instance_uid)
        if record is None or not record.usable_frame_indices:
            continue
        if store.upload(source.relative, source.path):
            uploaded += 1
            size += source.path.stat().st_size
    logger.info("uploaded %d instance(s), %d bytes, to %s in %.2f s", uploaded, size,
                store.name, time.perf_counter() - started)
    return uploaded


def run_qc(ctx: WorkerContext, job_id: int, *,
           keep: dict[str, DecodedInstance] | None = None,
           replicate: bool = True) -> QCDone | None:
    """QC of every analysed instance of the job's study (``keep``: see :func:`assess`).

    With a remote store and ``replicate``, the instances inference will read are uploaded
    before the job moves on (a failed upload leaves the job to be retried).
    """
    started = time.perf_counter()
    with ctx.db.session() as session:
        job = jobs.pending(session, job_id, JobState.QC_DONE)
        if job is None:
            return None
        study_uid = job.study_instance_uid
    sources = ctx.sources(study_uid)
    study_qc = assess(sources, max_frames=ctx.settings.max_frames_per_loop, keep=keep,
                      threads=ctx.settings.qc_threads)
    if replicate:
        upload_for_inference(ctx.instance_store(), sources, study_qc)
    with ctx.db.session() as session:
        recorded = jobs.advance(session, job_id, JobState.QC_DONE, qc=study_qc.to_json(),
                                seconds=time.perf_counter() - started)
    if recorded is None:
        return None
    logger.info("job %d: QC of %d instance(s) done (assessable=%s)", job_id,
                len(study_qc.instances), study_qc.assessable)
    return QCDone(job_id, study_qc)


# ----------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------
def analyse(study_uid: str, sources: Sequence[SourceImage], study_qc: StudyQC,
            analyser: Analyser, *, max_frames: int,
            decoded_by_qc: Mapping[str, DecodedInstance] | None = None,
            store: InstanceStore | None = None) -> Analysis:
    """Run the model packs on the frames QC found usable, with QC's scan region and mask.

    An instance in ``decoded_by_qc`` (QC ran in this process) is not decoded again; the
    others are read from ``store`` (``None``: the spooled file). A store that cannot be
    reached raises :class:`node.storage.StorageError` (the stage is retried); an instance
    missing from it is analysed as one that no longer decodes.
    """
    prepared: list[PreparedInstance] = []
    for source in sources:
        uid = source.header.sop_instance_uid
        record = study_qc.instances.get(uid)
        if record is None:
            continue  # arrived after QC: the next revision's job analyses it
        decoded: DecodedInstance | None = None
        if record.usable_frame_indices and decoded_by_qc and uid in decoded_by_qc:
            decoded = decoded_by_qc[uid]
        elif record.usable_frame_indices:
            try:
                if store is None:
                    decoded = load_instance(source.path, max_frames=max_frames)
                else:
                    with store.fetch(source.relative) as path:
                        decoded = load_instance(path, max_frames=max_frames)
            except (PixelDataError, OSError) as exc:
                logger.warning("%s no longer decodes: %s", uid, exc)
        if decoded is None:
            prepared.append(PreparedInstance(source.header, record.without_frames()))
        else:
            prepared.append(PreparedInstance(decoded, record.for_instance(decoded)))
    return analyser.analyse_study_monitored(study_uid, prepared, assessable=study_qc.assessable,
                                            study_checks=study_qc.study_checks)


def observe_drift(ctx: WorkerContext, analysis: Analysis, sources: Sequence[SourceImage],
                  study_qc: StudyQC) -> list[StreamStatus]:
    """Add the study to the drift streams of its vendors and packs; their statuses after it.

    Monitoring never costs a study its report: a failure here is logged and the study goes
    on without a drift status.
    """
    packs = ctx.analyser().packs
    headers = {s.header.sop_instance_uid: s.header for s in sources}
    stats = {uid: record.stats for uid, record in study_qc.instances.items()}
    try:
        streams = study_signals(analysis, packs, headers, stats)
        with ctx.db.session() as session:
            return [
                drift.observe(session, signals, pack.drift,
                              study_instance_uid=analysis.result.study_instance_uid,
                              aliases=ctx.settings.vendor_aliases,
                              baseline_studies=ctx.settings.drift_baseline_studies)
                for pack, signals in streams
            ]
    except Exception:
        logger.exception("drift monitoring of study %s failed; its report goes on",
                         analysis.result.study_instance_uid)
        return []


def flag_drift(result: StudyResult, statuses: Sequence[StreamStatus]) -> StudyResult:
    """The result, needing review with the reason, when a stream it belongs to is in alert."""
    reasons = [s.review_reason() for s in statuses if s.alert]
    if not reasons:
        return result
    return dataclasses.replace(
        result, needs_review=True,
        review_reasons=tuple(dict.fromkeys((*result.review_reasons, *reasons))))


def run_inference(ctx: WorkerContext, job_id: int, *,
                  decoded_by_qc: Mapping[str, DecodedInstance] | None = None,
                  beside_the_spool: bool = False) -> Inferred | None:
    """Run the model packs on the usable frames of the study and record the result.

    Instances are read from the context's store (:meth:`WorkerContext.instance_store`), or
    from the spool ``beside_the_spool`` (QC ran in this process, on this host).
    """
    started = time.perf_counter()
    with ctx.db.session() as session:
        job = jobs.pending(session, job_id, JobState.INFERRED)
        if job is None:
            return None
        if job.qc is None:
            raise RuntimeError(f"job {job_id} reached inference without QC results")
        study_qc = StudyQC.from_json(job.qc)
        study_uid = job.study_instance_uid
    sources = ctx.sources(study_uid)
    analysis = analyse(study_uid, sources, study_qc, ctx.analyser(),
                       max_frames=ctx.settings.max_frames_per_loop, decoded_by_qc=decoded_by_qc,
                       store=None if beside_the_spool else ctx.instance_store())
    result = flag_drift(analysis.result, observe_drift(ctx, analysis, sources, study_qc))
    vendors = {s.header.sop_instance_uid: s.vendor for s in sources}
    # Metrics label vendors as drift streams do: normalised, the site's aliases applied.
    labels = {s.header.sop_instance_uid: scanner_of(s.header.manufacturer,
                                                    s.header.manufacturer_model_name,
                                                    ctx.settings.vendor_aliases).vendor
              for s in sources}
    stats = {uid: record.stats for uid, record in study_qc.instances.items()}
    with ctx.db.session() as session:
        if not jobs.record_result(session, job_id, result, vendors=vendors, stats=stats,
                                  seconds=time.perf_counter() - started):
            return None
    logger.info("job %d: inference done (%d images, needs_review=%s)", job_id,
                len(result.images), result.needs_review)
    return Inferred(job_id, result, labels)


def run_analysis(ctx: WorkerContext, job_id: int) -> tuple[QCDone | None, Inferred | None]:
    """QC, then inference, in this process (the inference queue is this worker's): each
    instance is decoded once, and the job takes no hop through the broker in between.

    Each stage records its own state as when they run apart, so a job interrupted between
    them resumes with inference.
    """
    decoded: dict[str, DecodedInstance] = {}
    qc_done = run_qc(ctx, job_id, keep=decoded, replicate=False)
    return qc_done, run_inference(ctx, job_id, decoded_by_qc=decoded, beside_the_spool=True)


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def run_report(ctx: WorkerContext, job_id: int) -> Reported | None:
    """Build the SR for the job, store it durably, and create one export per destination."""
    started = time.perf_counter()
    with ctx.db.session() as session:
        job = jobs.pending(session, job_id, JobState.REPORTED)
        if job is None:
            return None
        if job.result is None:
            raise RuntimeError(f"job {job_id} reached reporting without a result")
        result = StudyResult.from_json(job.result)
        plan = jobs.plan_report(session, job)
    referenced = {image.sop_instance_uid for image in result.images}
    sources = [source.evidence_header() for source in ctx.sources(result.study_instance_uid)
               if source.header.sop_instance_uid in referenced]
    previous = plan.previous_sr_path
    sop_uid = generate_uid()
    sr = build_sr(
        sources,
        result,
        series_instance_uid=plan.series_instance_uid,
        sop_instance_uid=sop_uid,
        instance_number=plan.instance_number,
        previous_versions=[dcmread(previous)] if previous and previous.exists() else None,
        device_observer_uid=installation_uid(ctx.settings.data_dir),
    )
    final = ctx.settings.reports_dir / safe_component(result.study_instance_uid) / f"{sop_uid}.dcm"
    write_durably(final, lambda temp: sr.save_as(temp, enforce_file_format=True))
    if any(d.summary for d in ctx.settings.destinations):
        write_summary(ctx, result, sources, final, series_instance_uid=plan.series_instance_uid,
                      instance_number=plan.instance_number)
    destinations = [str(d) for d in ctx.settings.destinations]
    with ctx.db.session() as session:
        export_ids = jobs.record_report(session, job_id, sop_instance_uid=sop_uid,
                                        sr_path=str(final.resolve()), destinations=destinations,
                                        seconds=time.perf_counter() - started)
    if export_ids is None:
        for path in (final, *companions(final)):  # another copy of this stage reported first
            path.unlink(missing_ok=True)
        return None
    logger.info("job %d: SR %s written (%d destination(s))", job_id, sop_uid, len(export_ids))
    return Reported(job_id, sop_uid, result.needs_review, tuple(export_ids))


def companions(sr_path: Path) -> tuple[Path, Path]:
    """Where the AI summary image and the key-object selection of an SR are kept."""
    return sr_path.with_suffix(".summary.dcm"), sr_path.with_suffix(".kos.dcm")


def _key_frames(ctx: WorkerContext, result: StudyResult) -> dict[str, np.ndarray]:
    """The frame each analysed image's SR region is on, decoded again."""
    wanted = {im.sop_instance_uid: im for im in result.images if is_analysed(im)}
    frames: dict[str, np.ndarray] = {}
    for source in ctx.sources(result.study_instance_uid):
        image = wanted.get(source.header.sop_instance_uid)
        if image is None:
            continue
        try:
            decoded = load_instance(source.path, max_frames=ctx.settings.max_frames_per_loop)
        except (PixelDataError, OSError) as exc:
            logger.warning("summary: image %s not drawn (%s)", image.sop_instance_uid, exc)
            continue
        index = (image.key_frame or 1) - 1
        position = (decoded.frame_indices.index(index)
                    if index in decoded.frame_indices else 0)
        frames[image.sop_instance_uid] = decoded.frames[position]
    return frames


def write_summary(ctx: WorkerContext, result: StudyResult, sources: Sequence[Dataset],
                  sr_path: Path, *, series_instance_uid: str, instance_number: int) -> bool:
    """Write the AI summary image and the key-object selection beside the SR (for
    destinations marked ``?summary``). Their series are derived from the SR's, so a
    superseding report's land in the same series. Never costs the study its SR: a
    failure is logged and the SR goes alone."""
    summary_path, kos_path = companions(sr_path)
    try:
        summary = build_summary_image(
            sources[0], result, _key_frames(ctx, result),
            series_instance_uid=generate_uid(entropy_srcs=[series_instance_uid, "summary"]),
            sop_instance_uid=generate_uid(), instance_number=instance_number)
        write_durably(summary_path, lambda temp: summary.save_as(temp, enforce_file_format=True))
        if any(is_analysed(im) for im in result.images):
            kos = build_key_objects(
                sources, result, summary,
                series_instance_uid=generate_uid(entropy_srcs=[series_instance_uid, "kos"]),
                sop_instance_uid=generate_uid(), instance_number=instance_number,
                device_observer_uid=installation_uid(ctx.settings.data_dir))
            write_durably(kos_path, lambda temp: kos.save_as(temp, enforce_file_format=True))
    except Exception:
        logger.exception("study %s: AI summary not written; the SR is sent alone",
                         result.study_instance_uid)
        return False
    return True


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------
def pending_exports(ctx: WorkerContext, job_id: int) -> list[int]:
    """Ids of the job's exports that still have to be sent."""
    with ctx.db.session() as session:
        return jobs.open_exports(session, job_id)


def run_export(ctx: WorkerContext, export_id: int) -> ExportOutcome | None:
    """Send one SR to one destination; ``None`` when there was nothing to do.

    Raises :class:`workers.export.ExportTransientError` for the caller to retry and
    :class:`workers.export.ExportRefusedError` for a permanent refusal.
    """
    with ctx.db.session() as session:
        attempt = jobs.begin_attempt(session, export_id)
        if attempt is None:
            return None
        export, job = attempt
        if job.sr_path is None:
            raise RuntimeError(f"export {export_id}: job {job.id} has no SR")
        sr_path = Path(job.sr_path)
        destination = parse_destination(export.destination)
    paths = [sr_path]
    if destination.summary:
        paths += [path for path in companions(sr_path) if path.exists()]
    send_files(paths, destination, calling_ae_title=ctx.settings.ae_title,
               timeout_seconds=ctx.settings.network_timeout_seconds,
               tls=client_context(ctx.settings) if destination.tls else None)
    with ctx.db.session() as session:
        jobs.export_sent(session, export_id)
    return ExportOutcome(export_id, str(destination), ExportState.SENT)


def export_failed(ctx: WorkerContext, export_id: int, state: ExportState,
                  error: str) -> ExportOutcome:
    """Record a failed attempt (``retrying``) or the dead letter (``dead``)."""
    with ctx.db.session() as session:
        destination = jobs.export_failed(session, export_id, state, error)
    return ExportOutcome(export_id, destination or "unknown", state, error)


def fail_job(ctx: WorkerContext, job_id: int, error: str) -> None:
    """Mark the job (and its study) as failed for good."""
    with ctx.db.session() as session:
        jobs.fail_by_id(session, job_id, error)
