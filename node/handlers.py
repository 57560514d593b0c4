"""DIMSE handlers of the listener: plain functions, collaborators bound as arguments.

Every I/O step of a C-STORE fails into a named DICOM status (logged with the
exception); nothing raised here reaches pynetdicom, whose own fallback would answer
with a generic status and no log line of ours.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydicom import dcmread

from node import audit, sop_classes
from node.index import InstanceMeta, InvalidInstance, RegisterOutcome, is_indexed, register_instance
from node.logs import describe_error
from node.metrics import INSTANCES_RECEIVED, INSTANCES_REJECTED, RECEIVE_SECONDS
from node.receive import (
    DEFLATED_SYNTAXES,
    InflationLimitExceeded,
    inflated_size,
    receive_failure,
)
from node.spool import fsync_file

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from node.db import Database
    from node.spool import Spool

logger = logging.getLogger(__name__)

#: fsyncs of received files, started as each C-STORE's handler begins (threads: an fsync
#: releases the interpreter lock while it waits for the disk).
_SYNC_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")


class StoreStatus(IntEnum):
    """C-STORE response statuses the node answers with (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    """The instance is durable in the spool and indexed."""
    NOT_AUTHORISED = 0x0124
    """Refused by policy: calling AE not allowed, or modality not accepted."""
    OUT_OF_RESOURCES = 0xA700
    """Disk, file system or database failure: the sender should retry later."""
    DOES_NOT_MATCH = 0xA900
    """Dataset's SOP Class/Instance UID differ from the request's."""
    CANNOT_UNDERSTAND = 0xC210
    """Not a parseable DICOM dataset (corrupt, truncated, not DICOM at all)."""


@dataclass(frozen=True)
class StorePolicy:
    """What the listener accepts."""

    accept_non_ultrasound: bool = False
    calling_ae_whitelist: tuple[str, ...] = ()
    min_free_bytes: int = 64 * 1024 * 1024
    max_inflated_bytes: int = 512 * 1024 * 1024


class Reception:
    """What each association stored and refused, written to the audit trail when it ends."""

    def __init__(self) -> None:
        self._tallies: dict[int, Counter[str]] = {}
        self._studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def count(self, event: Event, outcome: str, study_uid: str | None = None) -> None:
        key = id(event.assoc)
        with self._lock:
            self._tallies.setdefault(key, Counter())[outcome] += 1
            if study_uid:
                self._studies.setdefault(key, set()).add(study_uid)

    def close(self, event: Event, db: Database) -> None:
        """EVT_CONN_CLOSE: one audit event per study the connection sent (if it stored or
        refused anything)."""
        key = id(event.assoc)
        with self._lock:
            tally = self._tallies.pop(key, None)
            studies = sorted(self._studies.pop(key, set()))
        if not tally:
            return
        requestor = event.assoc.requestor
        actor = f"dicom:{str(requestor.ae_title).strip()}@{requestor.address}"
        logger.info("association from %s closed: %s in %d stud%s", actor,
                    ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items())),
                    len(studies), "y" if len(studies) == 1 else "ies")
        try:
            with db.session() as session:
                targets: list[str | None] = list(studies) or [None]
                for study in targets:
                    audit.record(session, actor, audit.Action.RECEIVED, study=study,
                                 detail={**dict(tally), "studies": len(studies)})
        except Exception:
            logger.exception("audit of the association from %s not recorded", actor)


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success (verification)."""
    logger.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


def _reject(status: StoreStatus, reason: str, message: str, *args: object) -> int:
    INSTANCES_REJECTED.labels(reason=reason).inc()
    logger.warning("C-STORE refused (0x%04X %s): " + message, int(status), reason, *args)
    return int(status)


def handle_store(event: Event, spool: Spool, db: Database, policy: StorePolicy,
                 reception: Reception | None = None) -> int:
    """C-STORE: make the instance durable, index it, and only then answer Success.

    The dataset arrives as a file written by pynetdicom in the spool's incoming
    directory (``STORE_RECV_CHUNKED_DATASET``), so memory does not grow with the size
    of a cine loop; it is parsed without its pixel data, fsynced and renamed into the
    spool, then indexed.
    """
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    temp_path: Path | None = None
    try:
        temp_path = Path(event.dataset_path)
    except (AttributeError, TypeError):
        temp_path = None  # chunked receive is off (library use): the dataset is in memory

    try:
        with RECEIVE_SECONDS.time():
            status, study_uid = StoreStatus.OUT_OF_RESOURCES, None
            failure = receive_failure(temp_path) if temp_path is not None else None
            if failure is not None:
                status = StoreStatus(_reject(StoreStatus.OUT_OF_RESOURCES, "receive_failed",
                                             "from %s: the dataset could not be written (%s)",
                                             calling_ae, failure))
            else:
                studies: list[str] = []
                # The data's fsync runs while the header is parsed and checked (it waits on
                # the disk, the checks on the CPU); the rename waits for it.
                synced = _SYNC_POOL.submit(fsync_file, temp_path) if temp_path else None
                status = StoreStatus(_store(event, spool, db, policy, calling_ae, temp_path,
                                            studies, synced))
                study_uid = studies[0] if studies else None
            if reception is not None:
                reception.count(event, "stored" if status is StoreStatus.SUCCESS
                                else f"refused_0x{int(status):04X}", study_uid)
            return int(status)
    finally:
        # pynetdicom unlinks its temp file too; this covers every early return.
        if temp_path is not None and temp_path.exists():
            try:
                temp_path.unlink()
            except OSError:
                logger.warning("could not remove temporary file %s", temp_path)


def _store(
    event: Event,
    spool: Spool,
    db: Database,
    policy: StorePolicy,
    calling_ae: str,
    temp_path: Path | None,
    studies: list[str],
    data_synced: Future[None] | None = None,
) -> int:
    if policy.calling_ae_whitelist and calling_ae not in policy.calling_ae_whitelist:
        return _reject(StoreStatus.NOT_AUTHORISED, "calling_ae", "AE %r not allowed", calling_ae)

    request = cast("C_STORE", event.request)  # this handler is bound to EVT_C_STORE only
    transfer_syntax = str(event.context.transfer_syntax)

    # 1. Bound what parsing may cost, then parse the header (never the pixel data). The
    # file's meta group names the context's syntax (pynetdicom writes it): only a deflated
    # one can inflate.
    if temp_path is not None and transfer_syntax in DEFLATED_SYNTAXES:
        try:
            inflated_size(temp_path, policy.max_inflated_bytes)
        except InflationLimitExceeded as exc:
            return _reject(StoreStatus.CANNOT_UNDERSTAND, "inflation_limit", "from %s: %s",
                           calling_ae, exc)
        except (ValueError, OSError) as exc:
            return _reject(StoreStatus.CANNOT_UNDERSTAND, "unparseable", "from %s: %s",
                           calling_ae, describe_error(exc))
    try:
        ds: Dataset
        if temp_path is not None:
            # Parsed once, large values deferred (not read): the header for the index and
            # the element offsets for the completeness check below.
            ds = dcmread(temp_path, defer_size=_DEFER_BYTES)
        else:
            ds = event.dataset  # chunked receive is off (library use)
        meta = InstanceMeta.from_dataset(ds, transfer_syntax)
    except InvalidInstance as exc:
        # Our own checks (node.index.InstanceMeta): the message names the attribute only.
        return _reject(StoreStatus.CANNOT_UNDERSTAND, "unparseable", "from %s: %s",
                       calling_ae, exc)
    except Exception as exc:  # pydicom raises assorted errors on corrupt input
        # Its messages may quote a value (a patient's name): log the type and tags only.
        if temp_path is not None and _header_parses(temp_path):
            return _reject(StoreStatus.CANNOT_UNDERSTAND, "truncated",
                           "from %s: dataset is truncated or corrupt (%s)", calling_ae,
                           describe_error(exc))
        return _reject(StoreStatus.CANNOT_UNDERSTAND, "unparseable",
                       "from %s: dataset cannot be parsed (%s)", calling_ae, describe_error(exc))

    if temp_path is not None:
        try:
            check_complete(temp_path, ds)
        except Exception as exc:
            return _reject(StoreStatus.CANNOT_UNDERSTAND, "truncated",
                           "from %s: dataset is truncated or corrupt (%s)", calling_ae,
                           describe_error(exc))

    studies.append(meta.study_instance_uid)
    if meta.sop_instance_uid != str(request.AffectedSOPInstanceUID).strip() or (
        meta.sop_class_uid != str(request.AffectedSOPClassUID).strip()
    ):
        return _reject(
            StoreStatus.DOES_NOT_MATCH,
            "uid_mismatch",
            "dataset UIDs %s/%s differ from the request's",
            meta.sop_class_uid,
            meta.sop_instance_uid,
        )

    if not policy.accept_non_ultrasound and not sop_classes.is_ultrasound_department_object(
        meta.sop_class_uid, meta.modality
    ):
        return _reject(
            StoreStatus.NOT_AUTHORISED,
            "not_ultrasound",
            "modality %r (SOP class %s) not accepted (SONONODE_ACCEPT_NON_ULTRASOUND=false)",
            meta.modality,
            meta.sop_class_uid,
        )

    # 2. Idempotence: a re-sent instance is stored once.
    try:
        if is_indexed(db, meta.sop_instance_uid):
            logger.info("instance %s re-sent by %s: already stored", meta.sop_instance_uid,
                        calling_ae)
            INSTANCES_RECEIVED.labels(vendor=_vendor(meta), outcome="duplicate").inc()
            return int(StoreStatus.SUCCESS)
    except Exception:
        logger.exception("index unavailable while checking %s", meta.sop_instance_uid)
        return _reject(StoreStatus.OUT_OF_RESOURCES, "index_error", "index unavailable")

    # 3. Durable file in the spool.
    relative = spool.relative_path(
        meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
    )
    try:
        if spool.free_bytes() < policy.min_free_bytes:
            return _reject(StoreStatus.OUT_OF_RESOURCES, "disk_full", "spool disk nearly full")
        if temp_path is not None:
            final = spool.commit(temp_path, relative, data_synced=data_synced)
        else:
            final = spool.write_bytes(event.encoded_dataset(include_meta=True), relative)
        size = final.stat().st_size
    except OSError:
        logger.exception("cannot store %s in the spool", meta.sop_instance_uid)
        return _reject(StoreStatus.OUT_OF_RESOURCES, "spool_error", "spool write failed")

    # 4. Index. Success is answered only after this commit.
    try:
        outcome = register_instance(
            db, meta, path=str(relative), size_bytes=size, calling_ae_title=calling_ae
        )
    except Exception:
        logger.exception("cannot index %s", meta.sop_instance_uid)
        # Leave the file: a retry from the modality replaces it and indexes it.
        return _reject(StoreStatus.OUT_OF_RESOURCES, "index_error", "index write failed")

    INSTANCES_RECEIVED.labels(
        vendor=_vendor(meta),
        outcome="stored" if outcome is RegisterOutcome.NEW else "duplicate",
    ).inc()
    # Per instance at DEBUG (it costs a tenth of the handler's CPU); each association's
    # tally is logged at INFO when it closes (Reception.close).
    logger.debug(
        "stored %s (study %s, %s, %d frame(s), %d bytes, ts %s) from %s",
        meta.sop_instance_uid,
        meta.study_instance_uid,
        meta.manufacturer or "unknown vendor",
        meta.number_of_frames,
        size,
        meta.transfer_syntax_uid,
        calling_ae,
    )
    return int(StoreStatus.SUCCESS)


#: Values longer than this are not read when a received dataset is parsed (pixel data).
_DEFER_BYTES = 64 * 1024
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"


def _header_parses(path: Path) -> bool:
    """Whether the header before the pixel data parses (a dataset that fails to parse whole
    but has a sound header was cut short: reported as truncated, not unparseable)."""
    try:
        dcmread(path, stop_before_pixels=True)
    except Exception:
        return False
    return True


def check_complete(path: Path, ds: Dataset | None = None) -> None:
    """Raise ValueError unless the file holds every element it declares.

    ``ds`` is the file as already read with values over :data:`_DEFER_BYTES` deferred (it
    is read so when not given).

    A truncated stream parses up to where it stops (pydicom only warns), so the header
    alone proves nothing. Large values are deferred, not loaded: a defined-length value
    is checked against the file size; an encapsulated (undefined-length) pixel data value
    must consist of whole items followed by its sequence delimiter. A deflated dataset is
    inflated in memory, where a truncated stream fails to inflate or to parse.
    """
    size = path.stat().st_size
    if ds is None:
        ds = dcmread(path, defer_size=_DEFER_BYTES)
    deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) in DEFLATED_SYNTAXES
    if "SOPInstanceUID" not in ds:
        # pydicom gives up on (and empties) a dataset whose last value ends prematurely.
        raise ValueError("dataset is incomplete (truncated)")
    if "Rows" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData",
                                                   "DoubleFloatPixelData")):
        # pydicom drops an encapsulated value cut before its delimiter (with a warning).
        raise ValueError("image without pixel data: missing or truncated")
    for tag in list(ds.keys()):
        # The raw element, its deferred value left unread (keep_deferred): a cine loop's
        # pixel data is never loaded here, so memory stays flat however large it is.
        raw = ds.get_item(tag, keep_deferred=True)
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is None or length is None:
            continue
        if length == 0xFFFFFFFF:
            value = getattr(raw, "value", None)
            if isinstance(value, bytes | bytearray):
                _check_items(bytes(value), tag)
                if not deflated:
                    with open(path, "rb") as handle:
                        handle.seek(tell + len(value))
                        if handle.read(4) != _SEQUENCE_DELIMITER:
                            raise ValueError(f"element {tag}: no sequence delimiter (truncated)")
            elif value is None and not deflated:
                _check_items_in_file(path, tell, size, tag)
        elif not deflated and tell + length > size:
            raise ValueError(
                f"element {tag} declares {length} bytes at offset {tell}, file has {size} bytes"
            )


def _check_items_in_file(path: Path, tell: int, size: int, tag: object) -> None:
    """Walk the items of a deferred encapsulated value in the file from ``tell`` by their
    headers only (8 bytes each, the fragments skipped): every item complete, then the
    sequence delimiter."""
    with open(path, "rb") as handle:
        offset = tell
        while True:
            handle.seek(offset)
            header = handle.read(8)
            if len(header) < 8:
                raise ValueError(f"element {tag}: no sequence delimiter (truncated)")
            if header[:4] == _SEQUENCE_DELIMITER:
                return
            if header[:4] != _ITEM:
                raise ValueError(f"element {tag}: malformed item at byte {offset - tell}")
            offset += 8 + int.from_bytes(header[4:8], "little")
            if offset > size:
                raise ValueError(f"element {tag}: item at byte {offset - tell} is truncated")


def _check_items(value: bytes, tag: object) -> None:
    """Walk the items of an encapsulated value; every one must be complete."""
    offset = 0
    while offset < len(value):
        header = value[offset:offset + 8]
        if len(header) < 8 or header[:4] != _ITEM:
            raise ValueError(f"element {tag}: malformed item at byte {offset}")
        item_length = int.from_bytes(header[4:8], "little")
        offset += 8 + item_length
        if offset > len(value):
            raise ValueError(f"element {tag}: item at byte {offset} is truncated")


def _vendor(meta: InstanceMeta) -> str:
    return meta.manufacturer or "unknown"


def set_incoming_dir(path: Path) -> None:
    """Make pynetdicom write received datasets into ``path`` (same filesystem as the spool).

    pynetdicom creates its chunked-receive files with :class:`tempfile.NamedTemporaryFile`,
    which uses :data:`tempfile.tempdir`; pointing it at the spool's incoming directory turns
    the move into the spool into an atomic rename.
    """
    import tempfile

    path.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = os.fspath(path)
