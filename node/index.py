"""Index operations on received instances: what the listener records, what the stages read."""

from __future__ import annotations

import logging
import re
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import cast

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Insert, Table, bindparam, case, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db import Database, Instance, Study, StudyState, utcnow
from node.sop_classes import is_analysed

logger = logging.getLogger(__name__)


#: The attributes that identify an instance: each must be one valid UID.
IDENTITY = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID = re.compile(r"[0-9][0-9.]{0,63}")


class InvalidInstance(ValueError):
    """A received dataset cannot be filed: its identity is missing or malformed. The message
    names the attribute, never a value."""


class RegisterOutcome(StrEnum):
    """What registering an instance did."""

    NEW = "new"
    """First time this SOP Instance UID was seen: indexed, study revision bumped."""
    DUPLICATE = "duplicate"
    """Already indexed: the re-sent copy is discarded (stored once)."""


@dataclass(frozen=True)
class InstanceMeta:
    """Header fields of a received instance, read without its pixel data."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    photometric_interpretation: str | None
    series_number: int | None
    instance_number: int | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> InstanceMeta:
        """Read the fields from ``ds``.

        Raises
        ------
        InvalidInstance
            If a UID that identifies the instance is missing, empty or not one valid UID.
        """
        for keyword in IDENTITY:
            value = ds.get(keyword)
            if value is None or not str(value).strip():
                raise InvalidInstance(f"dataset lacks {keyword}")
            if not isinstance(value, str) or not _UID.fullmatch(value.strip()):
                # Multi-valued, too long, or characters no UID has: the instance cannot
                # be filed (and its path in the spool is built from these UIDs).
                raise InvalidInstance(f"{keyword} is not a single UID of at most 64 digits "
                                      "and dots")

        # Descriptive attributes are read leniently: a malformed one (wrong VR, bad
        # length) is recorded as absent, it does not refuse an image whose identity is
        # sound. pydicom raises assorted types when it converts a malformed raw value.
        def read(keyword: str) -> object:
            try:
                return ds.get(keyword)
            except Exception:
                return None

        def text(keyword: str, limit: int = 64) -> str | None:
            value = read(keyword)
            return str(value)[:limit] if value not in (None, "") else None

        def integer(keyword: str) -> int | None:
            value = read(keyword)
            try:
                return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
            except (TypeError, ValueError):
                return None

        return cls(
            sop_instance_uid=str(ds.SOPInstanceUID).strip(),
            sop_class_uid=str(ds.SOPClassUID).strip(),
            study_instance_uid=str(ds.StudyInstanceUID).strip(),
            series_instance_uid=str(ds.SeriesInstanceUID).strip(),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=text("Modality", 16),
            manufacturer=text("Manufacturer"),
            manufacturer_model_name=text("ManufacturerModelName"),
            number_of_frames=integer("NumberOfFrames") or 1,
            rows=integer("Rows"),
            columns=integer("Columns"),
            photometric_interpretation=text("PhotometricInterpretation", 16),
            series_number=integer("SeriesNumber"),
            instance_number=integer("InstanceNumber"),
            patient_id=text("PatientID"),
            accession_number=text("AccessionNumber", 16),
            study_date=text("StudyDate", 8),
            study_description=text("StudyDescription"),
        )


def analysed_instances(session: Session, study_uid: str) -> list[Instance]:
    """The instances of the study that are analysed (images), in series and instance order."""
    rows = session.scalars(
        select(Instance)
        .where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.series_number, Instance.instance_number, Instance.received_at)
    ).all()
    return [row for row in rows if is_analysed(row.sop_class_uid, row.modality)]


_INSTANCES = cast(Table, Instance.__table__)
_STUDIES = cast(Table, Study.__table__)


_IS_INDEXED = select(_INSTANCES.c.sop_instance_uid).where(
    _INSTANCES.c.sop_instance_uid == bindparam("b_sop"))


def _indexed(conn: Connection, sop_instance_uid: str) -> bool:
    return conn.execute(_IS_INDEXED, {"b_sop": sop_instance_uid}).first() is not None


def is_indexed(db: Database, sop_instance_uid: str) -> bool:
    """True when the instance is already in the index."""
    with db.engine.connect() as conn:
        return _indexed(conn, sop_instance_uid)


@dataclass(frozen=True)
class _Registration:
    meta: InstanceMeta
    path: str
    size_bytes: int
    calling_ae_title: str | None


class _Entry:
    """One registration waiting for its group's commit."""

    __slots__ = ("error", "outcome", "registration")

    def __init__(self, registration: _Registration) -> None:
        self.registration = registration
        self.outcome: RegisterOutcome | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class GroupCommit:
    """Registrations of concurrent associations committed together: one transaction, one
    commit (one fsync of the write-ahead log) for every instance that arrived meanwhile.

    The first caller to find no commit under way leads: it takes every registration
    queued so far, writes them in one transaction and commits, while callers arriving
    meanwhile queue for the next group, whose first member leads it in turn. A lone
    association commits its own registration at once, in its own thread (no hand-over).
    Without this, 20 associations' threads each commit alone and mostly wait in SQLite's
    busy handler for each other's write lock (py-spy on ``bench/receive.py --concurrent
    20``: 72 % of the handlers' time).

    Written by hand: neither SQLAlchemy nor the database drivers group commits.
    """

    #: The most registrations one transaction writes.
    max_group = 64

    def __init__(self) -> None:
        # No reference to the database: one GroupCommit per Database, looked up by it
        # in a weak mapping (a reference here would keep every Database alive).
        self._queue: list[_Entry] = []
        self._leading = False
        self._changed = threading.Condition()

    def register(self, db: Database, registration: _Registration) -> RegisterOutcome:
        entry = _Entry(registration)
        with self._changed:
            self._queue.append(entry)
        while True:
            with self._changed:
                while not entry.done and self._leading:
                    self._changed.wait()
                if entry.done:
                    break
                # Lead the next group (which may not reach this entry when more than
                # max_group are queued ahead of it: then lead again).
                self._leading = True
                group, self._queue = self._queue[:self.max_group], self._queue[self.max_group:]
            try:
                self._commit(db, group)
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()
        if entry.error is not None:
            raise entry.error
        assert entry.outcome is not None
        return entry.outcome

    @staticmethod
    def _commit(db: Database, group: list[_Entry]) -> None:
        try:
            outcomes = _register_group(db, [e.registration for e in group])
        except IntegrityError:
            # Another process indexed one of them meanwhile: each on its own, which sorts
            # out which are duplicates.
            for entry in group:
                try:
                    entry.outcome = _register_alone(db, entry.registration)
                except Exception as exc:
                    entry.error = exc
            return
        except BaseException as exc:
            for entry in group:
                entry.error = exc
            if not isinstance(exc, Exception):
                raise
            return
        for entry, outcome in zip(group, outcomes, strict=True):
            entry.outcome = outcome


_GROUPS: weakref.WeakKeyDictionary[Database, GroupCommit] = weakref.WeakKeyDictionary()
_GROUPS_LOCK = threading.Lock()


def _group_of(db: Database) -> GroupCommit:
    with _GROUPS_LOCK:
        group = _GROUPS.get(db)
        if group is None:
            group = _GROUPS[db] = GroupCommit()
        return group


def register_instance(
    db: Database, meta: InstanceMeta, *, path: str, size_bytes: int, calling_ae_title: str | None
) -> RegisterOutcome:
    """Index a durable instance and mark its study as receiving; durable on return.

    A new image bumps the study's revision and ``last_received_at``; the scheduler
    starts (or restarts) analysis once the study has been stable long enough.
    The study row is created if missing (two associations creating it at once do not
    collide); two copies of one instance arriving at once collide on the instance row, and
    the loser finds it indexed (stored once). Registrations arriving at once from this
    process's associations share one commit (:class:`GroupCommit`).
    """
    return _group_of(db).register(db, _Registration(meta, path, size_bytes, calling_ae_title))


def _register_alone(db: Database, registration: _Registration) -> RegisterOutcome:
    for attempt in range(3):
        try:
            return _register_group(db, [registration])[0]
        except IntegrityError:
            if is_indexed(db, registration.meta.sop_instance_uid):
                logger.info("instance %s indexed concurrently; keeping one copy",
                            registration.meta.sop_instance_uid)
                return RegisterOutcome.DUPLICATE
            logger.info("index write of %s collided with another; retrying (%d)",
                        registration.meta.sop_instance_uid, attempt + 1)
    return _register_group(db, [registration])[0]


def _study_insert(dialect: str) -> Insert:
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(_STUDIES).on_conflict_do_nothing(
        index_elements=[_STUDIES.c.study_instance_uid])


# Built once: this runs for every received instance, and building statements (let alone
# ORM objects and their unit of work) cost more CPU than the rest of the C-STORE handler
# (bench/receive.py).
_STUDY_INSERTS = {name: _study_insert(name) for name in ("sqlite", "postgresql")}
_STUDY_RECEIVED = update(_STUDIES).where(
    _STUDIES.c.study_instance_uid == bindparam("b_study")).values(
    # An SQL increment, not a Python read-modify-write: concurrent associations must not
    # lose revisions (a lost one could skip a re-analysis).
    revision=_STUDIES.c.revision + 1,
    last_received_at=bindparam("b_now"),
    updated_at=bindparam("b_now"),
    state=case((_STUDIES.c.state == StudyState.PROCESSING, StudyState.PROCESSING),
               else_=StudyState.RECEIVING),
)
_INSTANCE_INSERT = insert(_INSTANCES)


def _register_group(db: Database, group: list[_Registration]) -> list[RegisterOutcome]:
    """Index ``group`` in one transaction (a SOP instance twice in it: the second copy is a
    duplicate)."""
    now = utcnow()
    outcomes: list[RegisterOutcome] = []
    seen: set[str] = set()
    with db.engine.begin() as conn:
        for registration in group:
            meta = registration.meta
            if meta.sop_instance_uid in seen or _indexed(conn, meta.sop_instance_uid):
                outcomes.append(RegisterOutcome.DUPLICATE)
                continue
            seen.add(meta.sop_instance_uid)
            _insert(conn, registration, now)
            outcomes.append(RegisterOutcome.NEW)
    return outcomes


def _insert(conn: Connection, registration: _Registration, now: datetime) -> None:
    meta = registration.meta
    analysed = is_analysed(meta.sop_class_uid, meta.modality)
    conn.execute(_STUDY_INSERTS.get(conn.dialect.name, _STUDY_INSERTS["sqlite"]), {
        "study_instance_uid": meta.study_instance_uid,
        "patient_id": meta.patient_id,
        "accession_number": meta.accession_number,
        "study_date": meta.study_date,
        "study_description": meta.study_description,
        "state": StudyState.RECEIVING if analysed else StudyState.STORED,
        "revision": 0,
        "analysed_revision": 0,
        "first_received_at": now,
        "last_received_at": now,
        "updated_at": now,
    })
    if analysed:
        # Only images start (re-)analysis: documents and the node's own SRs echoed back
        # by a PACS must not.
        conn.execute(_STUDY_RECEIVED, {"b_study": meta.study_instance_uid, "b_now": now})
    conn.execute(_INSTANCE_INSERT, {
        "sop_instance_uid": meta.sop_instance_uid,
        "study_instance_uid": meta.study_instance_uid,
        "series_instance_uid": meta.series_instance_uid,
        "sop_class_uid": meta.sop_class_uid,
        "transfer_syntax_uid": meta.transfer_syntax_uid,
        "modality": meta.modality,
        "manufacturer": meta.manufacturer,
        "manufacturer_model_name": meta.manufacturer_model_name,
        "number_of_frames": meta.number_of_frames,
        "rows": meta.rows,
        "columns": meta.columns,
        "photometric_interpretation": meta.photometric_interpretation,
        "series_number": meta.series_number,
        "instance_number": meta.instance_number,
        "path": registration.path,
        "size_bytes": registration.size_bytes,
        "calling_ae_title": registration.calling_ae_title,
        "received_at": now,
    })
