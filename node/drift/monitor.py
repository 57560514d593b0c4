"""The sequential test of each drift stream, updated as each study is analysed.

For every signal a two-sided CUSUM (Page 1954) accumulates the study statistics ``t`` of
:mod:`node.drift.reference`: ``S+ = max(0, S+ + t - k)`` and ``S- = max(0, S- - t - k)``.
A signal alarms while a statistic is at or above its threshold ``h`` (set from the
reference for the stated false-alarm rate); a stream is in ``alert`` while any signal
alarms, ``warming`` while it has no reference (a pack without one: a site baseline is
being collected), ``ok`` otherwise. The statistics are capped at ``2h`` so that a stream
returns to ``ok`` within a few dozen studies of the shift ending. The update reads and
writes one row per stream (under a row lock), so its cost does not grow with history.

Written by hand: two lines of recursion per signal; what no library does is the
reference and the thresholds around them (:mod:`node.drift.reference`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db import DriftObservation, DriftStream, utcnow
from node.drift.reference import (
    GroupReference,
    Match,
    Reference,
    SignalReference,
    fit_group,
)
from node.drift.signals import ImageSignals, SignalKind, StudySignals, catalogue
from node.drift.vendors import Scanner, scanner_of

logger = logging.getLogger(__name__)


class Status:
    """Stream statuses (plain strings: they are JSON and Prometheus values)."""

    OK = "ok"
    WARMING = "warming"
    ALERT = "alert"


CONFIDENCE_WINDOW = 100
"""Studies over which the moving mean of confidence (expected accuracy) is taken."""
CAP_FACTOR = 2.0


@dataclass(frozen=True)
class StreamStatus:
    """A stream's status after a study: what the SR and the logs are told."""

    vendor: str
    scanner: str
    as_sent: str
    model: str
    status: str
    reasons: tuple[str, ...]

    @property
    def alert(self) -> bool:
        return self.status == Status.ALERT

    def review_reason(self) -> str:
        """The review reason a result produced during an alert carries."""
        return (f"drift alert for {self.as_sent} with {self.model}: "
                + "; ".join(self.reasons))


# ----------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------
def _stream(session: Session, scanner: Scanner, model: str) -> DriftStream:
    """The stream row, locked for this transaction (created on first use)."""
    query = (select(DriftStream)
             .where(DriftStream.vendor == scanner.vendor, DriftStream.scanner == scanner.scanner,
                    DriftStream.model == model)
             .with_for_update())
    row = session.scalars(query).first()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = DriftStream(vendor=scanner.vendor, scanner=scanner.scanner, model=model[:160],
                              as_sent=scanner.as_sent, status=Status.WARMING, reasons=[],
                              state={}, confidence={}, studies=0, images=0, reference="")
            session.add(row)
    except IntegrityError:
        # Another worker created it first: use (and lock) theirs.
        row = session.scalars(query).one()
    return row


def _site_group(stream: DriftStream) -> GroupReference | None:
    if not stream.baseline:
        return None
    return GroupReference.from_json(stream.baseline["group"])


def compared_with(stream: DriftStream, reference: Reference | None) -> Match | None:
    """The group a stream's studies are tested against, and which it is in words."""
    site = _site_group(stream)
    if site is not None:
        when = stream.baseline_at.strftime("%Y-%m-%d %H:%M UTC") if stream.baseline_at else "?"
        return Match(site, f"site baseline: {site.studies} studies of this stream, frozen {when}")
    if reference is None:
        return None
    return reference.group_for(stream.vendor, stream.scanner)


def _describe(spec_name: str, kind: SignalKind, up: bool) -> str:
    title = spec_name.replace("_", " ")
    if spec_name.endswith("_severe"):
        head = spec_name.removesuffix("_severe").replace("_", " ")
        return (f"expected share of the most severe {head} finding "
                f"{'higher' if up else 'lower'} than the reference")
    if kind is SignalKind.EMBEDDING:
        return "image embedding shifted away from the reference"
    if kind is SignalKind.CATEGORY:
        return (f"{title} unlike the reference (more labels it rarely saw)" if up
                else f"{title} narrower than the reference (its common labels more common)")
    return f"{title} {'higher' if up else 'lower'} than the reference"


def _update(signal: SignalReference, previous: Sequence[Any] | None,
            t: float) -> tuple[list[Any], float, str | None]:
    """New state ``[S+, S-, t, score, direction]``, the score (the larger statistic over its
    threshold) and the alarming direction (``"up"``, ``"down"`` or ``None``)."""
    up, down = (float(previous[0]), float(previous[1])) if previous else (0.0, 0.0)
    up = min(max(0.0, up + t - signal.allowance), CAP_FACTOR * signal.h_up)
    score_up = up / signal.h_up
    score_down = 0.0
    if signal.h_down is not None:
        down = min(max(0.0, down - t - signal.allowance), CAP_FACTOR * signal.h_down)
        score_down = down / signal.h_down
    else:
        down = 0.0
    score = max(score_up, score_down)
    direction = None
    if score >= 1.0:
        direction = "up" if score_up >= score_down else "down"
    state = [round(up, 5), round(down, 5), round(t, 4), round(score, 4), direction]
    return state, score, direction


@dataclass(frozen=True)
class Step:
    """The tests of a stream after one study."""

    state: dict[str, Any]
    statistics: dict[str, float]
    """Per signal, the study's standardised statistic ``t``."""
    scores: dict[str, float]
    """Per signal, the larger CUSUM statistic over its threshold (>= 1: alarming)."""
    reasons: list[str]
    """The alarming signals, in words (empty: no alarm)."""


def step(group: GroupReference, state: Mapping[str, Any],
         images: Sequence[ImageSignals]) -> Step:
    """Update every signal's test of a stream compared with ``group`` with one study."""
    new_state = dict(state)
    statistics: dict[str, float] = {}
    scores: dict[str, float] = {}
    reasons: list[str] = []
    for name, signal in group.signals.items():
        t = signal.statistic(images)
        if t is None or not math.isfinite(t):
            continue
        new_state[name], score, direction = _update(signal, new_state.get(name), t)
        statistics[name] = round(t, 4)
        scores[name] = round(score, 4)
        if direction is not None:
            reasons.append(_describe(name, signal.kind, direction == "up"))
    return Step(new_state, statistics, scores, reasons)


def observe(
    session: Session,
    study: StudySignals,
    reference: Reference | None,
    *,
    study_instance_uid: str,
    aliases: Mapping[str, str] | None = None,
    baseline_studies: int = 50,
) -> StreamStatus:
    """Add one study to its stream and return the stream's status after it.

    A study already observed in the stream (a re-analysis) does not count twice: the
    stream's current status is returned unchanged.
    """
    scanner = scanner_of(study.manufacturer, study.model_name, aliases)
    stream = _stream(session, scanner, study.model)
    seen = session.scalars(select(DriftObservation.id).where(
        DriftObservation.stream_id == stream.id,
        DriftObservation.study_instance_uid == study_instance_uid)).first()
    if seen is not None:
        return _status(stream)

    now = utcnow()
    images = list(study.images)
    target = compared_with(stream, reference)
    statistics: dict[str, float] = {}
    scores: dict[str, float] = {}
    if target is None:
        observed = session.scalar(select(func.count()).select_from(DriftObservation)
                                  .where(DriftObservation.stream_id == stream.id)) or 0
        stream.status = Status.WARMING
        stream.reference = (f"none yet: the pack has no drift reference; a site baseline is "
                            f"frozen after {baseline_studies} studies ({observed + 1} so far)")
        stream.reasons = [stream.reference]
    else:
        stream.reference = target.note[:256]
        result = step(target.group, stream.state or {}, images)
        statistics, scores = result.statistics, result.scores
        stream.state = result.state
        stream.status = Status.ALERT if result.reasons else Status.OK
        stream.reasons = [*result.reasons, target.note] if target.fallback else result.reasons
    stream.confidence = _moving_confidence(stream.confidence or {}, images,
                                           target.group.confidence if target else {})
    stream.studies += 1
    stream.images += len(images)
    stream.last_study_at = now
    session.add(DriftObservation(stream_id=stream.id, study_instance_uid=study_instance_uid,
                                 observed_at=now, images=[im.to_json() for im in images],
                                 statistics=statistics, scores=scores, status=stream.status))
    session.flush()
    if target is None and reference is None:
        _maybe_freeze(session, stream, study, baseline_studies)
    return _status(stream)


def _moving_confidence(current: Mapping[str, Any], images: Sequence[ImageSignals],
                       reference: Mapping[str, float]) -> dict[str, Any]:
    """Per head ``[recent, reference]``: the moving mean of the calibrated confidence over
    about :data:`CONFIDENCE_WINDOW` studies and its mean on the reference. For a calibrated
    model the mean confidence is the expected accuracy: an estimate without labels, valid
    only as long as calibration holds (it does not under a strong shift)."""
    out = {k: list(v) for k, v in current.items() if isinstance(v, list)}
    weight = 1.0 / CONFIDENCE_WINDOW
    names = {k for im in images for k in im.values if k.endswith("_confidence")}
    for name in sorted(names):
        values = [v for im in images if isinstance(v := im.values.get(name), int | float)]
        if not values:
            continue
        head = name.removesuffix("_confidence")
        mean = sum(float(v) for v in values) / len(values)
        recent = mean if head not in out else (1 - weight) * float(out[head][0]) + weight * mean
        out[head] = [round(recent, 5), reference.get(head)]
    return out


def _status(stream: DriftStream) -> StreamStatus:
    return StreamStatus(vendor=stream.vendor, scanner=stream.scanner, as_sent=stream.as_sent,
                        model=stream.model, status=stream.status,
                        reasons=tuple(stream.reasons or ()))


# ----------------------------------------------------------------------------------------
# Site baselines
# ----------------------------------------------------------------------------------------
class BaselineError(ValueError):
    """A site baseline cannot be frozen (too few studies)."""


def freeze_baseline(session: Session, stream: DriftStream, *, heads: Sequence[str] | None = None,
                    studies: int = 100, seed: int = 0) -> GroupReference:
    """Fit a site baseline from the stream's latest ``studies`` studies and compare the
    stream with it from now on (its tests restart from zero).

    Raises
    ------
    BaselineError
        With fewer observed studies than :data:`node.drift.reference.MIN_STUDIES`.
    """
    rows = session.scalars(select(DriftObservation)
                           .where(DriftObservation.stream_id == stream.id)
                           .order_by(DriftObservation.id.desc()).limit(studies)).all()
    observed = [[ImageSignals.from_json(im) for im in row.images] for row in reversed(rows)]
    observed = [s for s in observed if s]
    if heads is None:
        heads = sorted({k.removesuffix("_mix") for s in observed for im in s
                        for k in im.values if k.endswith("_mix")})
    try:
        group = fit_group(observed, catalogue(heads), vendor=stream.vendor,
                          scanner=stream.scanner, seed=seed)
    except ValueError as exc:
        raise BaselineError(str(exc)) from None
    stream.baseline = {"group": group.to_json(), "studies": len(observed)}
    stream.baseline_at = utcnow()
    stream.state = {}
    stream.status = Status.OK
    stream.reasons = []
    match = compared_with(stream, None)
    stream.reference = match.note[:256] if match is not None else ""
    logger.info("drift: site baseline frozen for %s / %s / %s from %d studies",
                stream.vendor, stream.scanner, stream.model, len(observed))
    return group


def clear_baseline(stream: DriftStream) -> None:
    """Compare the stream with the pack's reference again (its tests restart from zero)."""
    stream.baseline = None
    stream.baseline_at = None
    stream.state = {}
    stream.status = Status.WARMING
    stream.reasons = []
    stream.reference = "the pack's reference again, from the stream's next study"


def _maybe_freeze(session: Session, stream: DriftStream, study: StudySignals,
                  baseline_studies: int) -> None:
    count = session.scalar(select(func.count()).select_from(DriftObservation)
                           .where(DriftObservation.stream_id == stream.id)) or 0
    if count < baseline_studies:
        return
    try:
        freeze_baseline(session, stream, heads=study.heads, studies=baseline_studies)
    except BaselineError as exc:
        logger.warning("drift: no site baseline for %s / %s yet: %s", stream.vendor,
                       stream.model, exc)

