"""What drift monitoring shows: ``/drift``, ``/drift/{vendor}``, the dashboard, Prometheus.

Everything here reads the stream rows (one per vendor, scanner and model) and, for the
history, the latest observations: the cost of a scrape or a page does not grow with the
number of studies ever analysed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import Database, DriftObservation, DriftStream
from node.drift.monitor import Status
from node.drift.reference import DEFAULT_FALSE_ALARMS, RUN_LENGTH
from node.drift.signals import ALLOWANCE, SLOW_ALLOWANCE, describe

METHOD = (
    "Per vendor, scanner and model pack, each study's signals (input statistics, prediction "
    "mix and confidence per head, OOD score, embedding, QC-fail/OOD/review rates) are "
    "compared with a reference (the pack's reference studies, or a site baseline) and fed "
    f"to a two-sided CUSUM per signal (allowance {ALLOWANCE} sd; {SLOW_ALLOWANCE} sd for the "
    "expected share of each finding's most severe label, to see a changed prevalence). "
    "Thresholds are set by "
    "bootstrap on reference studies not used to fit the distributions, so that a stream "
    f"without shift has at most {DEFAULT_FALSE_ALARMS} false-alarm episode(s) per "
    f"{RUN_LENGTH} studies (all its signals together)."
)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def stream_json(stream: DriftStream) -> dict[str, Any]:
    """One stream as ``/drift`` shows it."""
    signals: list[dict[str, Any]] = []
    for name, state in sorted((stream.state or {}).items()):
        score = float(state[3]) if len(state) > 3 else 0.0
        direction = state[4] if len(state) > 4 else None
        signals.append({"name": name, "description": describe(name), "score": round(score, 3),
                        "direction": direction, "alarming": score >= 1.0})
    signals.sort(key=lambda s: -s["score"])
    accuracy = {
        head: {"recent": value[0], "reference": value[1]}
        for head, value in sorted((stream.confidence or {}).items())
        if isinstance(value, list) and len(value) == 2
    }
    return {
        "vendor": stream.vendor,
        "scanner": stream.scanner,
        "vendor_as_sent": stream.as_sent,
        "model": stream.model,
        "status": stream.status,
        "studies": stream.studies,
        "images": stream.images,
        "reference": stream.reference,
        "baseline_frozen_at": _iso(stream.baseline_at),
        "reasons": list(stream.reasons or []),
        "signals": signals,
        "expected_accuracy": accuracy,
        "last_study_at": _iso(stream.last_study_at),
    }


def drift_report(session: Session) -> dict[str, Any]:
    """Every stream, alerting first."""
    order = {Status.ALERT: 0, Status.WARMING: 1, Status.OK: 2}
    streams = sorted(session.scalars(select(DriftStream)).all(),
                     key=lambda s: (order.get(s.status, 3), s.vendor, s.scanner, s.model))
    return {
        "streams": [stream_json(s) for s in streams],
        "false_alarm_target_per_1000_studies": DEFAULT_FALSE_ALARMS * 1000 / RUN_LENGTH,
        "method": METHOD,
    }


def vendor_report(session: Session, vendor: str, *, limit: int = 500) -> dict[str, Any] | None:
    """The streams of one vendor and their latest ``limit`` observations, oldest first;
    ``None`` for a vendor never seen."""
    streams = session.scalars(select(DriftStream).where(DriftStream.vendor == vendor)
                              .order_by(DriftStream.scanner, DriftStream.model)).all()
    if not streams:
        return None
    by_id = {s.id: s for s in streams}
    rows = session.execute(
        select(DriftObservation.stream_id, DriftObservation.observed_at,
               DriftObservation.status, DriftObservation.scores)
        .where(DriftObservation.stream_id.in_(list(by_id)))
        .order_by(DriftObservation.id.desc()).limit(limit)).all()
    history = [
        {"at": _iso(at), "scanner": by_id[sid].scanner, "model": by_id[sid].model,
         "status": status, "scores": scores or {}}
        for sid, at, status, scores in reversed(rows)
    ]
    return {"vendor": vendor, "streams": [stream_json(s) for s in streams], "history": history}


def drift_metric_families(db: Database) -> Iterator[GaugeMetricFamily]:
    """``sononode_drift_score{vendor,scanner,model,signal}``, ``sononode_drift_alert``,
    ``sononode_drift_warming`` and ``sononode_drift_studies`` (by vendor, scanner, model)."""
    labels = ["vendor", "scanner", "model"]
    score = GaugeMetricFamily(
        "sononode_drift_score",
        "Drift test statistic over its alarm threshold (>= 1: the signal alarms).",
        labels=[*labels, "signal"])
    alert = GaugeMetricFamily("sononode_drift_alert",
                              "1 while the stream is in drift alert.", labels=labels)
    warming = GaugeMetricFamily("sononode_drift_warming",
                                "1 while the stream has no reference yet.", labels=labels)
    studies = GaugeMetricFamily("sononode_drift_studies", "Studies observed by the stream.",
                                labels=labels)
    with db.session() as session:
        for stream in session.scalars(select(DriftStream)).all():
            key = [stream.vendor, stream.scanner, stream.model]
            alert.add_metric(key, 1.0 if stream.status == Status.ALERT else 0.0)
            warming.add_metric(key, 1.0 if stream.status == Status.WARMING else 0.0)
            studies.add_metric(key, float(stream.studies))
            for name, state in (stream.state or {}).items():
                if len(state) > 3:
                    score.add_metric([*key, name], float(state[3]))
    yield score
    yield alert
    yield warming
    yield studies
