"""Response bodies of the API (pydantic), built from index rows.

Each model documents one body in ``/openapi.json``. Times are UTC (``...Z``). Results and QC
are the JSON the workers store (``dicom_sr.model.StudyResult.to_json`` and
``workers.imaging.types.StudyQC.to_json``), passed through as objects.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from node.db import Export, ExportState, Instance, Job, JobState, Study, StudyState


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
    result: dict[str, Any] | None = Field(description="Result of the latest job.")
    needs_review: bool | None

    @classmethod
    def of(cls, study: Study, instances: list[Instance]) -> StudyDetail:
        latest = study.jobs[-1] if study.jobs else None
        result = latest.result if latest else None
        return cls.model_validate({
            **_study_fields(study),
            "ai_series_instance_uid": study.sr_series_instance_uid,
            "instances": [InstanceOut.model_validate(i) for i in instances],
            "vendors": sorted({i.manufacturer or "unknown" for i in instances}),
            "jobs": [JobOut.of(job) for job in study.jobs],
            "result": result,
            "needs_review": bool(result.get("needs_review")) if result else None,
        })


class ModelList(_Body):
    models: list[dict[str, Any]] = Field(
        description="Per configured pack folder: its manifest (identity, tasks, calibration, "
        "metrics, provenance) or an error."
    )


class VendorDrift(_Body):
    vendor: str
    images: int
    psi: dict[str, float | None]


class DriftReport(_Body):
    vendors: list[VendorDrift]
    threshold_hint: float


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
