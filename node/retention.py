"""Data minimisation: spooled pixel data deleted after ``SONONODE_RETENTION_DAYS``.

A study whose last image arrived more than that many days ago, and whose analysis has
ended (exported, export failed, failed, or stored only), loses its spooled files; its
index rows, results, reports and audit trail stay, and :class:`node.db.PurgedStudy`
records what was deleted. ``sononode purge`` runs it by hand; the scheduler runs it hourly
when a retention is configured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from node import audit
from node.db import Database, Instance, PurgedStudy, Study, StudyState, utcnow
from node.spool import Spool
from node.storage import InstanceStore, StorageError

logger = logging.getLogger(__name__)

#: States in which a study's pixel data are no longer needed by the node.
ENDED = (StudyState.EXPORTED, StudyState.EXPORT_FAILED, StudyState.FAILED, StudyState.STORED)


@dataclass(frozen=True)
class PurgeReport:
    studies: int
    files: int
    bytes: int


def purge(db: Database, spool: Spool, *, days: float, now: datetime | None = None,
          dry_run: bool = False, actor: str = "scheduler",
          store: InstanceStore | None = None) -> PurgeReport:
    """Delete the spooled files of studies ended more than ``days`` ago, and their copies
    in a remote ``store`` (first: a study whose copies cannot be deleted now keeps its
    files and is purged on a later run)."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    studies = files = size = 0
    with db.session() as session:
        done = set(session.scalars(select(PurgedStudy.study_instance_uid)))
        candidates = [s for s in session.scalars(select(Study).where(
            Study.last_received_at < cutoff, Study.state.in_(ENDED)))
            if s.study_instance_uid not in done]
        for study in candidates:
            removed = removed_bytes = 0
            rows = list(session.scalars(select(Instance).where(
                Instance.study_instance_uid == study.study_instance_uid)))
            if store is not None and store.remote and not dry_run:
                try:
                    for row in rows:
                        store.delete(row.path)
                except StorageError as exc:
                    logger.warning("retention: copies of a study not deleted from %s (%s); "
                                   "its files are kept until the next run", store.name, exc)
                    continue
            for row in rows:
                try:
                    path = spool.absolute(row.path)
                except ValueError:
                    continue
                if path.is_file():
                    removed_bytes += path.stat().st_size
                    removed += 1
                    if not dry_run:
                        path.unlink()
            studies += 1
            files += removed
            size += removed_bytes
            if dry_run:
                continue
            session.add(PurgedStudy(study_instance_uid=study.study_instance_uid,
                                    files=removed, bytes=removed_bytes))
            audit.record(session, actor, audit.Action.PURGED, study=study.study_instance_uid,
                         detail={"files": removed, "bytes": removed_bytes,
                                 "retention_days": days})
    if studies:
        logger.info("retention (%s days)%s: %d studies, %d files, %d bytes", days,
                    " dry run" if dry_run else "", studies, files, size)
    return PurgeReport(studies, files, size)
