"""Response bodies of the API (pydantic), built from index rows.

Each model documents one body in ``/openapi.json``. Times are UTC (``...Z``). Results and QC
are the JSON the workers store (``dicom_sr.model.StudyResult.to_json`` and
``workers.imaging.types.StudyQC.to_json``), passed through as objects.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dicom_sr import tracking_uid
from node.db import (
    Export,
    ExportState,
    Feedback,
    FeedbackVerdict,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
)
from node.feedback import ResultItem


def _as_utc(value: datetime) -> datetime:
    # The index stores naive UTC (same in SQLite and PostgreSQL).
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class _Body(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Health(_Body):
    """Liveness."""

    status: str = "ok"


class Readiness(_Body):
    """Readiness and the check behind it."""

    ready: bool
    checks: dict[str, str] = Field(description="Per collaborator: 'ok' or 'error: ...'.")


class ExportOut(_Body):
    """Delivery of one SR to one destination."""

    id: int
    job_id: int
    study_instance_uid: str
    destination: str
    state: ExportState
    attempts: int
    last_error: str | None
    created_at: UTCDateTime | None
    """When the SR was written and the delivery queued."""
    updated_at: UTCDateTime | None
    sent_at: UTCDateTime | None

    @classmethod
    def of(cls, export: Export) -> ExportOut:
        return cls.model_validate(export)


class ExportList(_Body):
    exports: list[ExportOut]


class _StudyFields(_Body):
    study_instance_uid: str
    state: StudyState
    revision: int = Field(description="Incremented by every new image; a job analyses one.")
    accession_number: str | None
    study_date: str | None
    first_received_at: UTCDateTime
    last_received_at: UTCDateTime


class StudySummary(_StudyFields):
    """A study in the index."""

    instances: int = Field(description="Instances received (images and documents).")

    @classmethod
    def of(cls, study: Study, instances: int) -> StudySummary:
        return cls.model_validate({**_study_fields(study), "instances": instances})


def _study_fields(study: Study) -> dict[str, Any]:
    return {name: getattr(study, name) for name in _StudyFields.model_fields}


class StudyList(_Body):
    studies: list[StudySummary]
    limit: int
    offset: int


class InstanceOut(_Body):
    """A received instance (identifiers and acquisition facts, no patient data)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    number_of_frames: int
    transfer_syntax_uid: str
    received_at: UTCDateTime


class JobOut(_Body):
    """One analysis of one revision of a study."""

    id: int
    revision: int
    state: JobState
    attempts: int
    error: str | None
    created_at: UTCDateTime
    updated_at: UTCDateTime
    stage_seconds: dict[str, float] | None
    qc: dict[str, Any] | None = Field(description="QC record of every analysed instance.")
    result: dict[str, Any] | None = Field(description="The study result the SR reports.")
    sr_sop_instance_uid: str | None
    exports: list[ExportOut]

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id, revision=job.revision, state=job.state, attempts=job.attempts,
            error=job.error, created_at=job.created_at, updated_at=job.updated_at,
            stage_seconds=job.stage_seconds, qc=job.qc, result=job.result,
            sr_sop_instance_uid=job.sr_sop_instance_uid,
            exports=[ExportOut.of(e) for e in job.exports],
        )


class StudyDetail(_StudyFields):
    """A study with its instances, jobs, latest result and exports."""

    ai_series_instance_uid: str | None
    instances: list[InstanceOut]
    vendors: list[str]
    jobs: list[JobOut]
    result: dict[str, Any] | None = Field(description="Result of the latest job (with its "
                                          "model packs' name, version and sha256, and QC).")
    needs_review: bool | None
    sr_sop_instance_uid: str | None = Field(description="The latest job's SR.")
    tracking_uids: dict[str, str] = Field(
        description="Per analysed image (SOP Instance UID), the Tracking UID of its "
        "measurement group in the SR: what POST /feedback names.")
    feedback: list[FeedbackOut] = Field(description="Readers' verdicts on the study's "
                                        "results, oldest first.")

    @classmethod
    def of(cls, study: Study, instances: list[Instance],
           feedback: list[Feedback]) -> StudyDetail:
        latest = study.jobs[-1] if study.jobs else None
        result = latest.result if latest else None
        images = (result or {}).get("images", [])
        return cls.model_validate({
            **_study_fields(study),
            "ai_series_instance_uid": study.sr_series_instance_uid,
            "instances": [InstanceOut.model_validate(i) for i in instances],
            "vendors": sorted({i.manufacturer or "unknown" for i in instances}),
            "jobs": [JobOut.of(job) for job in study.jobs],
            "result": result,
            "needs_review": bool(result.get("needs_review")) if result else None,
            "sr_sop_instance_uid": latest.sr_sop_instance_uid if latest else None,
            "tracking_uids": {im["sop_instance_uid"]: tracking_uid(im["sop_instance_uid"])
                              for im in images},
            "feedback": [FeedbackOut.model_validate(f) for f in feedback],
        })


#: A DICOM UID: digits and dots, at most 64 characters.
DicomUID = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]


class FeedbackRequest(_Body):
    """A reader's verdict on one result of one image, named as the SR shows it."""

    sr_sop_instance_uid: DicomUID = Field(description="SOP Instance UID of the SR.")
    tracking_uid: DicomUID = Field(description="Tracking UID of the image's measurement "
                                   "group (also in GET /studies/{uid} as tracking_uids).")
    item: ResultItem = Field(description="Which result of the image: its view or finding.")
    verdict: FeedbackVerdict
    corrected_label: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="With verdict 'corrected': the right label, one of the pack's label "
        "names for that head (GET /models).")
    comment: str | None = Field(default=None, max_length=500,
                                description="Free text; keep patient data out of it.")


class FeedbackOut(_Body):
    """A stored verdict."""

    id: int
    at: datetime
    actor: str
    study_instance_uid: str
    sr_sop_instance_uid: str
    tracking_uid: str
    sop_instance_uid: str
    item: str
    task: str
    model: str
    vendor: str
    predicted_label: str
    predicted_probability: float
    verdict: FeedbackVerdict
    corrected_label: str | None
    comment: str | None


class FeedbackList(_Body):
    feedback: list[FeedbackOut]


class ModelList(_Body):
    models: list[dict[str, Any]] = Field(
        description="Per configured pack folder: its manifest (identity, tasks, calibration, "
        "metrics, provenance) or an error."
    )


class ReanalyseRequest(_Body):
    """Why a study is analysed again (kept in the audit trail)."""

    reason: str = Field(default="", max_length=500)


class ReanalyseOut(_Body):
    """The job a re-analysis created."""

    study_instance_uid: str
    job_id: int
    state: JobState
    dispatched: bool = Field(description="False when the broker was unavailable: the "
                             "scheduler dispatches the job on its next pass.")


class DriftSignal(_Body):
    """One monitored signal of a stream."""

    name: str
    description: str
    score: float = Field(description="Test statistic over its alarm threshold: >= 1 alarms.")
    direction: Literal["up", "down"] | None = Field(
        description="Which way the alarming signal moved (null when not alarming).")
    alarming: bool


class ExpectedAccuracy(_Body):
    """Mean calibrated confidence of a head: its accuracy if calibration still holds."""

    recent: float
    reference: float | None


class DriftStreamOut(_Body):
    """Drift of one vendor, scanner and model pack."""

    vendor: str = Field(description="Normalised Manufacturer (after the site's aliases).")
    scanner: str = Field(description="Normalised Manufacturer's Model Name.")
    vendor_as_sent: str
    model: str = Field(description="Model pack, 'name version'.")
    status: Literal["ok", "warming", "alert"]
    studies: int
    images: int
    reference: str = Field(description="What the stream is compared with, in words.")
    baseline_frozen_at: UTCDateTime | None
    reasons: list[str]
    signals: list[DriftSignal]
    expected_accuracy: dict[str, ExpectedAccuracy]
    last_study_at: UTCDateTime | None


class DriftReport(_Body):
    streams: list[DriftStreamOut]
    false_alarm_target_per_1000_studies: float
    method: str


class DriftPoint(_Body):
    """The scores of one stream after one study."""

    at: UTCDateTime
    scanner: str
    model: str
    status: Literal["ok", "warming", "alert"]
    scores: dict[str, float]


class VendorDriftReport(_Body):
    vendor: str
    streams: list[DriftStreamOut]
    history: list[DriftPoint]


class BaselineRequest(_Body):
    """Which stream of the vendor to freeze a site baseline for, from how many of its
    latest studies."""

    scanner: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=160)
    studies: int | None = Field(default=None, ge=20, le=10000,
                                description="Default: SONONODE_DRIFT_BASELINE_STUDIES.")


class AuditEventOut(_Body):
    """One audit event: who did what to which study, when."""

    id: int
    at: UTCDateTime
    actor: str
    action: str
    study_instance_uid: str | None
    detail: dict[str, Any]


class AuditList(_Body):
    events: list[AuditEventOut]


class DashboardWindow(StrEnum):
    """How far back ``/dashboard/data`` looks (and so the size of its time buckets)."""

    DAY = "24h"
    """The last 24 hours, in hourly buckets."""
    WEEK = "7d"
    """The last 7 days, in hourly buckets."""
    MONTH = "30d"
    """The last 30 days, in daily buckets."""
    QUARTER = "90d"
    """The last 90 days, in daily buckets."""


class BucketSize(StrEnum):
    """Width of one time bucket of the dashboard."""

    HOUR = "hour"
    """One hour."""
    DAY = "day"
    """One day (UTC)."""


class DashboardBucket(_Body):
    """What one vendor sent through one model in one time bucket."""

    start: UTCDateTime = Field(description="Start of the bucket (UTC).")
    images: int = Field(description="Analysed images (a cine loop counts once).")
    studies: int
    qc_fail: int = Field(description="Images whose QC outcome was 'fail'.")
    needs_review: int = Field(description="Images whose result asks for human review.")
    ood: int | None = Field(description="Images whose OOD score is above the pack's threshold "
                            "(None: no configured pack of that name states a threshold).")


class DashboardStream(_Body):
    """One vendor (Manufacturer as sent) through one set of model packs, over the window."""

    vendor: str
    model: str = Field(description="Names of the model packs that analysed the images.")
    images: int
    studies: int = Field(description="Sum of the buckets' studies.")
    qc_fail: int
    needs_review: int
    ood: int | None
    ood_threshold: float | None = Field(
        description="The OOD threshold of the configured pack the OOD score comes from.")
    views: dict[str, int] = Field(description="Predicted views: images per label.")
    findings: dict[str, int] = Field(description="Predicted findings: images per label.")
    last_image_at: UTCDateTime | None
    buckets: list[DashboardBucket] = Field(description="Only the buckets with images.")


class ExportBacklog(_Body):
    """Deliveries of SRs not done yet, and the dead letters."""

    by_state: dict[ExportState, int] = Field(description="Exports per state (every state).")
    oldest_pending_at: UTCDateTime | None = Field(
        description="Creation of the oldest export still pending or retrying.")
    oldest_pending_age_seconds: float | None
    dead_letters: list[ExportOut] = Field(description="The latest dead-lettered exports.")


class WorkerOut(_Body):
    """A live Celery worker, from its heartbeat."""

    name: str
    queues: str
    can_analyse: bool
    device: str | None
    problem: str | None
    started_at: UTCDateTime
    last_seen: UTCDateTime


class DashboardData(_Body):
    """What the IT dashboard shows: volume, rates and prediction mix per vendor and model,
    exports, workers and readiness. No patient data."""

    node: str = Field(description="The node's AE title.")
    version: str
    generated_at: UTCDateTime
    window: DashboardWindow
    bucket: BucketSize
    since: UTCDateTime = Field(description="Start of the first bucket.")
    bucket_starts: list[UTCDateTime] = Field(description="Every bucket of the window, in order.")
    streams: list[DashboardStream]
    vendors_without_images: list[str] = Field(
        description="Vendors with analysed images before the window but none in it.")
    exports: ExportBacklog
    readiness: Readiness
    workers: list[WorkerOut]
