"""The IT dashboard: an HTML page without data, and the JSON it draws (``/dashboard/data``).

The page (``node/api/static/dashboard.html``) needs no token to load and holds nothing; its
script asks ``/dashboard/data`` and the drift endpoints with the reader's bearer token.
Every figure here comes from a bounded query: the vendors by a loose index scan, then
GROUP BY over a time window that seeks the ``(manufacturer, created_at)`` index, in SQL
that SQLite and PostgreSQL both run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from sqlalchemy import ColumnElement, Select, String, and_, case, func, literal, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from dicom_sr.model import QCOutcome
from node.api.deps import AUTH_RESPONSES, ContextDep, SessionDep, get_principal
from node.api.routes.pages import PAGE_HEADERS, STATIC_DIR
from node.api.schemas import (
    BucketSize,
    DashboardBucket,
    DashboardData,
    DashboardStream,
    DashboardWindow,
    ExportBacklog,
    ExportOut,
    Readiness,
    WorkerOut,
)
from node.db import Export, ExportState, ImageResultRow, Job, utcnow
from node.readiness import assess

logger = logging.getLogger(__name__)

#: How far back each window looks, and in which buckets.
WINDOWS: Mapping[DashboardWindow, tuple[timedelta, BucketSize]] = {
    DashboardWindow.DAY: (timedelta(hours=24), BucketSize.HOUR),
    DashboardWindow.WEEK: (timedelta(days=7), BucketSize.HOUR),
    DashboardWindow.MONTH: (timedelta(days=30), BucketSize.DAY),
    DashboardWindow.QUARTER: (timedelta(days=90), BucketSize.DAY),
}
_BUCKET_WIDTH = {BucketSize.HOUR: timedelta(hours=1), BucketSize.DAY: timedelta(days=1)}

#: At most this many vendors are shown (each costs one index seek to find).
MAX_VENDORS = 64
#: The latest dead letters listed on the page.
DEAD_LETTERS_SHOWN = 10

#: Exports that still have to be delivered.
_BACKLOG = (ExportState.PENDING, ExportState.RETRYING)

page_router = APIRouter(tags=["dashboard"])
router = APIRouter(prefix="/dashboard", tags=["dashboard"],
                   dependencies=[Depends(get_principal)], responses=AUTH_RESPONSES)


@page_router.get("/dashboard", response_class=FileResponse, include_in_schema=False)
def dashboard_page() -> FileResponse:
    """The dashboard's HTML shell (no data; its script fetches ``/dashboard/data``)."""
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html",
                        headers=PAGE_HEADERS)


@router.get("/data", response_model=DashboardData)
def dashboard_data(request: Request, context: ContextDep, session: SessionDep,
                   window: DashboardWindow = DashboardWindow.WEEK) -> DashboardData:
    """Per vendor and model over ``window``: volume, QC/review/OOD counts and prediction mix
    in time buckets; exports, workers and readiness."""
    now = utcnow()
    span, size = WINDOWS[window]
    starts = bucket_starts(now, span, size)
    vendors = known_vendors(session)
    streams = vendor_streams(session, vendors, since=starts[0], size=size,
                             thresholds=ood_thresholds(context.models()))
    seen = {s.vendor for s in streams}
    # What /ready answers, from the same assessment.
    assessment = assess(context.db, redis_url=context.redis_url,
                        spool=context.settings.spool_dir)
    return DashboardData(
        node=context.settings.ae_title,
        version=request.app.version,
        generated_at=now,
        window=window,
        bucket=size,
        since=starts[0],
        bucket_starts=starts,
        streams=streams,
        vendors_without_images=[v for v in vendors if v not in seen],
        exports=export_backlog(session, now=now),
        readiness=Readiness(ready=assessment.ready, checks=assessment.checks),
        workers=[WorkerOut.model_validate(w) for w in
                 sorted(assessment.workers, key=lambda w: w.name)],
    )


# ----------------------------------------------------------------------------------------
# Time buckets
# ----------------------------------------------------------------------------------------
def truncate(moment: datetime, size: BucketSize) -> datetime:
    """Start of the bucket that holds ``moment``."""
    hour = moment.replace(minute=0, second=0, microsecond=0)
    return hour if size is BucketSize.HOUR else hour.replace(hour=0)


def bucket_starts(now: datetime, span: timedelta, size: BucketSize) -> list[datetime]:
    """Every bucket of the window ending with the one that holds ``now``, oldest first."""
    width = _BUCKET_WIDTH[size]
    count = int(span / width)
    last = truncate(now, size)
    return [last - width * (count - 1 - i) for i in range(count)]


class _TimeBucket(FunctionElement[str]):
    """``bucket(timestamp)``: the start of the timestamp's bucket as ``YYYY-MM-DD HH:00:00``
    text, in each dialect's own function (one subclass per size, so that the size is part
    of SQLAlchemy's statement cache key)."""

    type = String()
    inherit_cache = True
    size: ClassVar[BucketSize]


class _HourBucket(_TimeBucket):
    size = BucketSize.HOUR
    inherit_cache = True


class _DayBucket(_TimeBucket):
    size = BucketSize.DAY
    inherit_cache = True


_BUCKET_FUNCTION: Mapping[BucketSize, type[_TimeBucket]] = {
    BucketSize.HOUR: _HourBucket, BucketSize.DAY: _DayBucket}

# The formats are constants written into the SQL, not bound parameters: PostgreSQL must
# see the same expression in SELECT and GROUP BY, and two bound copies would differ.
_SQLITE_FORMAT = {BucketSize.HOUR: "%Y-%m-%d %H:00:00", BucketSize.DAY: "%Y-%m-%d 00:00:00"}
_POSTGRES_FORMAT = {BucketSize.HOUR: "YYYY-MM-DD HH24:00:00",
                    BucketSize.DAY: "YYYY-MM-DD 00:00:00"}


@compiles(_TimeBucket, "sqlite")
def _bucket_sqlite(element: _TimeBucket, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"strftime('{_SQLITE_FORMAT[element.size]}', {column})"


@compiles(_TimeBucket, "postgresql")
def _bucket_postgres(element: _TimeBucket, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"to_char({column}, '{_POSTGRES_FORMAT[element.size]}')"


# ----------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------
def known_vendors(session: Session, *, limit: int = MAX_VENDORS) -> list[str]:
    """Every vendor with analysed images, sorted: one ``MIN(manufacturer) > previous`` seek
    of the ``(manufacturer, created_at)`` index per vendor (a loose index scan), where
    ``SELECT DISTINCT`` would read the whole index."""
    vendors: list[str] = []
    previous: str | None = None
    while len(vendors) < limit:
        query = select(func.min(ImageResultRow.manufacturer))
        if previous is not None:
            query = query.where(ImageResultRow.manufacturer > previous)
        found = session.scalar(query)
        if found is None:
            break
        vendors.append(found)
        previous = found
    else:
        logger.warning("%d vendors or more: the dashboard shows the first %d", limit, limit)
    return vendors


def ood_thresholds(catalogue: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Pack name -> its OOD threshold, for the configured packs that state one."""
    thresholds: dict[str, float] = {}
    for entry in catalogue:
        ood = entry.get("ood")
        name = entry.get("name")
        if isinstance(name, str) and isinstance(ood, Mapping) \
                and isinstance(ood.get("threshold"), int | float):
            thresholds.setdefault(name, float(ood["threshold"]))
    return thresholds


def stream_threshold(model: str, thresholds: Mapping[str, float]) -> float | None:
    """The threshold that applies to a row's OOD score: the row names its packs in order,
    comma-separated, and its score is the first pack's that has an OOD score."""
    for name in (n.strip() for n in model.split(",")):
        if name in thresholds:
            return thresholds[name]
    return None


def _in_window(vendors: Sequence[str], since: datetime) -> ColumnElement[bool]:
    # Equality on the index's first column and a range on its second: an index seek per
    # vendor in SQLite and PostgreSQL alike.
    return and_(ImageResultRow.manufacturer.in_(vendors), ImageResultRow.created_at >= since)


def _count(condition: ColumnElement[bool] | InstrumentedAttribute[bool]) -> ColumnElement[int]:
    """How many rows of the group meet ``condition`` (a boolean column or expression)."""
    return func.sum(case((condition, 1), else_=0))


def mix_query(vendors: Sequence[str], since: datetime
              ) -> Select[str, str | None, str | None, str | None, int, datetime]:
    """Images per vendor, model, predicted view and finding, with the latest image."""
    row = ImageResultRow
    return (select(row.manufacturer, row.model_name, row.view_label, row.finding_label,
                   func.count(), func.max(row.created_at))
            .where(_in_window(vendors, since))
            .group_by(row.manufacturer, row.model_name, row.view_label, row.finding_label))


def bucket_query(vendors: Sequence[str], since: datetime, size: BucketSize,
                 ood: Mapping[str | None, float]
                 ) -> Select[str, str | None, str, int, int, int, int, int]:
    """Per vendor, model and bucket: start, images, studies, QC fails, reviews, OOD images
    (``ood``: model name -> the threshold its rows' scores are compared with)."""
    row = ImageResultRow
    bucket = _BUCKET_FUNCTION[size](row.created_at)
    over = [and_(row.model_name.is_(None) if name is None else row.model_name == name,
                 row.ood_score > threshold) for name, threshold in ood.items()]
    return (select(row.manufacturer, row.model_name, bucket, func.count(),
                   func.count(func.distinct(Job.study_instance_uid)),
                   _count(row.qc_outcome == QCOutcome.FAIL.value),
                   _count(row.needs_review),
                   _count(or_(*over)) if over else literal(0))
            .join(Job, Job.id == row.job_id)
            .where(_in_window(vendors, since))
            .group_by(row.manufacturer, row.model_name, bucket))


@dataclass
class _Stream:
    """One vendor and model, summed up from the grouped rows."""

    vendor: str
    model: str | None
    threshold: float | None
    views: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)
    last_image_at: datetime | None = None
    buckets: list[DashboardBucket] = field(default_factory=list)

    def body(self) -> DashboardStream:
        known = self.threshold is not None
        return DashboardStream(
            vendor=self.vendor, model=self.model or "",
            images=sum(b.images for b in self.buckets),
            studies=sum(b.studies for b in self.buckets),
            qc_fail=sum(b.qc_fail for b in self.buckets),
            needs_review=sum(b.needs_review for b in self.buckets),
            ood=sum(b.ood or 0 for b in self.buckets) if known else None,
            ood_threshold=self.threshold,
            views=dict(sorted(self.views.items())),
            findings=dict(sorted(self.findings.items())),
            last_image_at=self.last_image_at,
            buckets=sorted(self.buckets, key=lambda b: b.start),
        )


def vendor_streams(session: Session, vendors: Sequence[str], *, since: datetime,
                   size: BucketSize, thresholds: Mapping[str, float]) -> list[DashboardStream]:
    """Per vendor and model: totals, prediction mix and the buckets that have images."""
    if not vendors:
        return []
    streams: dict[tuple[str, str | None], _Stream] = {}
    for vendor, model, view, finding, images, latest in session.execute(
            mix_query(vendors, since)):
        stream = streams.get((vendor, model))
        if stream is None:
            stream = streams[(vendor, model)] = _Stream(
                vendor, model, stream_threshold(model or "", thresholds))
        if view is not None:
            stream.views[view] = stream.views.get(view, 0) + images
        if finding is not None:
            stream.findings[finding] = stream.findings.get(finding, 0) + images
        if stream.last_image_at is None or latest > stream.last_image_at:
            stream.last_image_at = latest
    ood = {model: s.threshold for (_, model), s in streams.items() if s.threshold is not None}
    for vendor, model, start, images, studies, qc_fail, review, over in session.execute(
            bucket_query(vendors, since, size, ood)):
        stream = streams.get((vendor, model))
        if stream is None:  # a row committed between the two queries
            continue
        stream.buckets.append(DashboardBucket(
            start=datetime.fromisoformat(start), images=images, studies=studies,
            qc_fail=qc_fail or 0, needs_review=review or 0,
            ood=(over or 0) if stream.threshold is not None else None))
    return [s.body() for _, s in sorted(streams.items(),
                                        key=lambda item: (item[0][0], item[0][1] or ""))]


def export_backlog(session: Session, *, now: datetime) -> ExportBacklog:
    """Exports per state, the age of the oldest undelivered one and the latest dead letters."""
    counts = dict.fromkeys(ExportState, 0)
    for state, count in session.execute(
            select(Export.state, func.count()).group_by(Export.state)):
        counts[state] = count
    oldest = session.scalar(select(func.min(Export.created_at))
                            .where(Export.state.in_(_BACKLOG)))
    dead = session.scalars(select(Export).where(Export.state == ExportState.DEAD)
                           .order_by(Export.id.desc()).limit(DEAD_LETTERS_SHOWN)).all()
    return ExportBacklog(
        by_state=counts,
        oldest_pending_at=oldest,
        oldest_pending_age_seconds=(now - oldest).total_seconds() if oldest else None,
        dead_letters=[ExportOut.of(e) for e in dead],
    )
