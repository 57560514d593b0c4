"""The index: SQLAlchemy models and sessions. The database is the node's source of truth.

Every state change of a study, a job or an export is a row update here, made by
:mod:`node.jobs` (the lifecycle) or :mod:`node.index` (received instances); the broker only
carries identifiers. SQLite (WAL mode) by default, PostgreSQL by URL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy import Enum as SQLEnum
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC now: stored the same way in SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


class StudyState(StrEnum):
    """Where a study is in its life on the node."""

    STORED = "stored"
    """Only objects that are not analysed (documents, non-US images): stored, nothing to do."""
    RECEIVING = "receiving"
    """Images are arriving; not yet stable for ``study_stable_seconds``."""
    PROCESSING = "processing"
    """A job runs for the study (QC, inference, report)."""
    REPORTED = "reported"
    """The SR exists; exports are under way."""
    EXPORTED = "exported"
    """The SR of the latest job was accepted by every destination."""
    EXPORT_FAILED = "export_failed"
    """At least one export was dead-lettered (see ``/exports``; replayable)."""
    FAILED = "failed"
    """The job failed permanently (see the job's error)."""


class JobState(StrEnum):
    """Stages of one analysis job (QC -> inference -> report -> export), in order."""

    QUEUED = "queued"
    """Created for a stable study revision; QC runs next."""
    QC_DONE = "qc_done"
    """QC's record is stored (``Job.qc``); inference runs next."""
    INFERRED = "inferred"
    """The study result is stored (``Job.result``); the report stage runs next."""
    REPORTED = "reported"
    """The SR is durable (``Job.sr_path``); exports to the destinations are under way."""
    DONE = "done"
    """Every export has an outcome (or there was no destination)."""
    FAILED = "failed"
    """Failed for good (``Job.error``); a re-analysis creates a new job."""


class ExportState(StrEnum):
    """Delivery of one SR to one destination."""

    PENDING = "pending"
    """Created with the SR; not attempted yet (or replayed)."""
    RETRYING = "retrying"
    """An attempt failed transiently; Celery retries with backoff."""
    SENT = "sent"
    """The destination answered Success (or a storing warning)."""
    DEAD = "dead"
    """Retry budget spent or permanent refusal; replay with ``POST /exports/{id}/replay``."""


class FeedbackVerdict(StrEnum):
    """What a reader said about one AI result."""

    AGREE = "agree"
    """The result is right."""
    DISAGREE = "disagree"
    """The result is wrong; the right label is not given."""
    CORRECTED = "corrected"
    """The result is wrong; ``Feedback.corrected_label`` is the right one."""


def _state_column(enum: type[StrEnum]) -> SQLEnum:
    """A typed state column stored as the members' lower-case values (VARCHAR, no DB enum)."""
    return SQLEnum(enum, native_enum=False, create_constraint=False, length=16,
                   values_callable=lambda members: [m.value for m in members])


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012
        dict[str, Any]: JSON,
        list[int]: JSON,
        list[dict[str, Any]]: JSON,
        StudyState: _state_column(StudyState),
        JobState: _state_column(JobState),
        ExportState: _state_column(ExportState),
        FeedbackVerdict: _state_column(FeedbackVerdict),
    }


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[StudyState] = mapped_column(default=StudyState.RECEIVING, index=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    """Incremented for every new instance; a job analyses one revision."""
    analysed_revision: Mapped[int] = mapped_column(Integer, default=0)
    """Revision of the latest job created for the study."""
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    sr_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(String(64), index=True)
    manufacturer_model_name: Mapped[str | None] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    """Relative to the spool directory."""
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    """How many times the chain was dispatched (the reconciler re-dispatches stale jobs)."""
    error: Mapped[str | None] = mapped_column(Text)
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    stage_seconds: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")
    exports: Mapped[list[Export]] = relationship(back_populates="job", order_by="Export.id")


class ImageResultRow(Base):
    """One row per analysed image: what the dashboards and drift monitoring read."""

    __tablename__ = "image_results"
    __table_args__ = (Index("ix_image_results_vendor_time", "manufacturer", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    manufacturer: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    qc_outcome: Mapped[str] = mapped_column(String(8))
    view_label: Mapped[str | None] = mapped_column(String(64))
    view_probability: Mapped[float | None] = mapped_column(Float)
    finding_label: Mapped[str | None] = mapped_column(String(64))
    finding_probability: Mapped[float | None] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float)
    needs_review: Mapped[bool] = mapped_column(default=False)
    mean_intensity: Mapped[float | None] = mapped_column(Float)
    std_intensity: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class StageRun(Base):
    """One execution of a job stage by a worker process (what recovery after a crash reads)."""

    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    """The Celery task name."""
    worker: Mapped[str] = mapped_column(String(128), index=True)
    """The worker (``host:pid`` of its main process) whose pool process runs the stage."""
    pid: Mapped[int] = mapped_column(Integer)
    """The pool process."""
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    lost: Mapped[bool] = mapped_column(default=False)
    """The process died while running the stage (found by the reconciler)."""


class WorkerHeartbeat(Base):
    """A live Celery worker: what it serves and whether it can analyse (updated every few s)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    """``host:pid`` of the worker's main process."""
    queues: Mapped[str] = mapped_column(String(64))
    pool_pids: Mapped[list[int]] = mapped_column(JSON, default=list)
    can_analyse: Mapped[bool] = mapped_column(default=False)
    """It consumes the inference queue and its device and model packs are usable."""
    device: Mapped[str | None] = mapped_column(String(32))
    packs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    problem: Mapped[str | None] = mapped_column(Text)
    """Why it cannot analyse (a missing pack, CUDA requested but absent)."""
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class AuditEvent(Base):
    """One entry of the append-only audit trail (never updated, never deleted by the node;
    no pixel data, no patient names: identifiers, actors and outcomes)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_study_time", "study_instance_uid", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    """``dicom:<calling AE>@<address>``, ``api:<role>:<token id>@<address>``, ``worker``,
    ``scheduler``, ``cli``."""
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PurgedStudy(Base):
    """A study whose spooled pixel data were deleted by retention (results and audit stay)."""

    __tablename__ = "purged_studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    purged_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)


class DriftStream(Base):
    """The drift monitor of one vendor, scanner and model pack (:mod:`node.drift`)."""

    __tablename__ = "drift_streams"
    __table_args__ = (UniqueConstraint("vendor", "scanner", "model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vendor: Mapped[str] = mapped_column(String(64))
    scanner: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(160))
    as_sent: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(8), default="warming")
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    reference: Mapped[str] = mapped_column(String(256), default="")
    """Which reference the stream is compared with, in words."""
    studies: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Per signal ``[S+, S-, t, score, direction]``: the upper and lower CUSUM statistics,
    the last study statistic, the score (>= 1: alarming) and its direction."""
    confidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Per head ``[recent, reference]`` mean calibrated confidence (expected accuracy)."""
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """A site baseline frozen from the stream's own studies (replaces the pack's group)."""
    baseline_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_study_at: Mapped[datetime | None] = mapped_column(DateTime)


class DriftObservation(Base):
    """One study's signals in one drift stream, with the test's state after it."""

    __tablename__ = "drift_observations"
    __table_args__ = (
        UniqueConstraint("stream_id", "study_instance_uid"),
        Index("ix_drift_observations_stream", "stream_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stream_id: Mapped[int] = mapped_column(ForeignKey("drift_streams.id"))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    observed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    statistics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    scores: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(8))


class Feedback(Base):
    """A reader's verdict on one result (view or finding) of one image in one SR."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    tracking_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    item: Mapped[str] = mapped_column(String(16))
    """``view`` or ``finding``: which result of the image."""
    task: Mapped[str] = mapped_column(String(32))
    """The pack's head that produced it (``view``, ``nodule``, ...)."""
    model: Mapped[str] = mapped_column(String(160))
    """The pack, ``"name version"``."""
    vendor: Mapped[str] = mapped_column(String(64))
    """Normalised vendor of the image (:func:`node.drift.vendors.scanner_of`)."""
    predicted_label: Mapped[str] = mapped_column(String(64))
    predicted_probability: Mapped[float] = mapped_column(Float)
    verdict: Mapped[FeedbackVerdict] = mapped_column(index=True)
    corrected_label: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)


class Export(Base):
    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[ExportState] = mapped_column(default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)

    job: Mapped[Job] = relationship(back_populates="exports")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the listener, scheduler, workers and API read while one of them writes;
    # the busy timeout makes concurrent writers wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the node's connection settings."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    return engine


#: PostgreSQL advisory lock key held while the schema is created (any fixed number that
#: no other application on the server uses for a lock: "sononode" in ASCII).
SCHEMA_LOCK_KEY = 0x736F6E6F6E6F6465


class Database:
    """Engine plus session factory for one process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables (idempotent; every process calls it on start).

        Roles starting at once on a new database (two listeners, the workers) would race
        to create the same tables: on PostgreSQL the creation holds a transaction-level
        advisory lock, so one creates and the others find the tables; SQLite serialises
        writers itself, and a loser of the check-then-create race tries once more.
        """
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": SCHEMA_LOCK_KEY})
                Base.metadata.create_all(connection)
            return
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            if "already exists" not in str(exc):
                raise
            Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close every pooled connection (before a fork, or at exit)."""
        self.engine.dispose()


def open_database(url: str, data_dir: Path | None = None, *,
                  wait_seconds: float = 0.0) -> Database:
    """Open (and create the schema of) the index at ``url``.

    The data directory is created first so that the default SQLite file can be made. With
    ``wait_seconds``, a database that cannot be reached yet (PostgreSQL still starting) is
    retried with backoff for that long before the error is raised.
    """
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    deadline = time.monotonic() + wait_seconds
    delay = 0.5
    while True:
        try:
            db.create_schema()
            return db
        except OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database not reachable yet (%s); retrying in %.1f s",
                           type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
