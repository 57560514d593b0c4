"""The DICOM listener against real associations on free ports (pynetdicom SCU and DCMTK)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures import CT_IMAGE, make_us_dataset, require_tools, write
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select

from harness.peers import dcmsend
from node.config import Settings
from node.db import Database, Instance, Study
from node.handlers import StoreStatus, check_complete
from node.listener import start_listener

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def listener(settings: Settings, db: Database) -> Iterator[Settings]:
    server = start_listener(settings, db, block=False)
    assert server is not None
    yield settings
    server.shutdown()


def _send(settings: Settings, path: Path, *, raw: bool = False) -> int | None:
    """C-STORE ``path``; ``raw`` sends the file's bytes as they are (corrupt input)."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID,
                             [ds.file_meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(status.Status) if status and "Status" in status else None


def _count(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_echo(listener: Settings) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", listener.dicom_port, ae_title=listener.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_store_is_durable_indexed_and_idempotent(listener: Settings, db: Database,
                                                 tmp_path: Path) -> None:
    study = generate_uid()
    files = [write(make_us_dataset(study_uid=study, seed=i), tmp_path / f"{i}.dcm")
             for i in range(3)]
    assert all(_send(listener, f) == StoreStatus.SUCCESS for f in files)
    assert _count(db) == 3
    # Re-sent instance: Success again, stored once, study revision unchanged.
    assert _send(listener, files[0]) == StoreStatus.SUCCESS
    assert _count(db) == 3
    with db.session() as session:
        row = session.get(Study, study)
        assert row is not None and row.revision == 3
        stored = session.scalars(select(Instance)).all()
    spooled = sorted(listener.spool_dir.rglob("*.dcm"))
    assert len(spooled) == 3
    for instance in stored:
        ds = dcmread(listener.spool_dir / instance.path)
        assert ds.SOPInstanceUID == instance.sop_instance_uid
        assert instance.manufacturer == "Test Vendor"
    # Nothing left behind in the incoming directory.
    assert not [p for p in listener.incoming_dir.iterdir() if p.is_file()]


@pytest.mark.dcmtk
def test_dcmsend_modality(listener: Settings, db: Database, tmp_path: Path) -> None:
    require_tools("dcmsend")
    study = generate_uid()
    files = [write(make_us_dataset(study_uid=study, seed=i), tmp_path / f"{i}.dcm")
             for i in range(4)]
    dcmsend(listener.dicom_port, files)
    assert _count(db) == 4


def _corrupt(tmp_path: Path) -> Path:
    """Valid file meta, then a dataset whose element lengths are nonsense."""
    path = write(make_us_dataset(), tmp_path / "corrupt.dcm")
    data = bytearray(path.read_bytes())
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    data[meta_end:meta_end + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def _truncated(tmp_path: Path) -> Path:
    path = write(make_us_dataset(rows=256, cols=256), tmp_path / "truncated.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20000])
    return path


def _not_dicom(tmp_path: Path) -> Path:
    """File meta (so the SCU can frame it) followed by a non-DICOM byte stream."""
    path = write(make_us_dataset(), tmp_path / "garbage.dcm")
    data = bytearray(path.read_bytes())
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    garbage = b"%PDF-1.4 this is not a DICOM dataset at all \x00\x01\x02" * 50
    path.write_bytes(bytes(data[:meta_end]) + garbage)
    return path


@pytest.mark.parametrize("make", [_corrupt, _truncated, _not_dicom],
                         ids=["corrupt", "truncated", "not_dicom"])
def test_bad_input_gets_failure_status_and_listener_keeps_serving(
    make: Callable[[Path], Path], listener: Settings, db: Database, tmp_path: Path
) -> None:
    bad = make(tmp_path)
    status = _send(listener, bad, raw=True)
    assert status is not None and status != StoreStatus.SUCCESS
    assert status in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DOES_NOT_MATCH)
    assert _count(db) == 0
    # The next association is served normally.
    good = write(make_us_dataset(), tmp_path / "good.dcm")
    assert _send(listener, good) == StoreStatus.SUCCESS
    assert _count(db) == 1


def test_check_complete_detects_truncation(tmp_path: Path) -> None:
    path = write(make_us_dataset(rows=128, cols=128), tmp_path / "a.dcm")
    check_complete(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match="declares"):
        check_complete(path)


def _encapsulated(tmp_path: Path, fragments: int, fragment_bytes: int) -> Path:
    """A dataset whose encapsulated pixel data (RLE transfer syntax, fragments of random
    bytes: the check walks items, it does not decode) is larger than the deferral limit."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(1)
    ds = make_us_dataset(rows=64, cols=64)
    ds.NumberOfFrames = fragments
    ds.PixelData = encapsulate([rng.bytes(fragment_bytes) for _ in range(fragments)])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(tmp_path / "encapsulated.dcm", enforce_file_format=True)
    return tmp_path / "encapsulated.dcm"


def test_check_complete_walks_large_encapsulated_values_in_the_file(tmp_path: Path) -> None:
    path = _encapsulated(tmp_path, fragments=40, fragment_bytes=50_000)
    check_complete(path)
    data = path.read_bytes()
    for cut in (len(data) - 4, len(data) - 30_000, len(data) - 150_000):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"truncated|declares|delimiter"):
            check_complete(path)


def test_check_complete_never_loads_the_pixel_data(tmp_path: Path) -> None:
    """A 20 MB native loop and a 2 MB encapsulated one are checked with memory that does
    not grow with them (the values are deferred and stay unread)."""
    native = make_us_dataset(rows=480, cols=640)
    native.NumberOfFrames = 66
    native.PixelData = bytes(480 * 640 * 66)
    paths = [write(native, tmp_path / "native.dcm"),
             _encapsulated(tmp_path, fragments=40, fragment_bytes=50_000)]
    for path in paths:
        tracemalloc.start()
        try:
            check_complete(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, f"{path.name}: {peak} bytes traced"


def test_non_ultrasound_refused_by_default(settings: Settings, db: Database,
                                           tmp_path: Path) -> None:
    # A secondary capture whose Modality is CT is negotiated but refused by policy.
    server = start_listener(settings, db, block=False)
    assert server is not None
    try:
        sc = make_us_dataset(sop_class="1.2.840.10008.5.1.4.1.1.7", modality="CT")
        assert _send(settings, write(sc, tmp_path / "sc.dcm")) == StoreStatus.NOT_AUTHORISED
        assert _count(db) == 0
    finally:
        server.shutdown()


def test_non_ultrasound_accepted_when_configured(settings: Settings, db: Database,
                                                 tmp_path: Path) -> None:
    accepting = settings.model_copy(update={"accept_non_ultrasound": True})
    server = start_listener(accepting, db, block=False)
    assert server is not None
    try:
        ct = make_us_dataset(sop_class=CT_IMAGE, modality="CT")
        assert _send(accepting, write(ct, tmp_path / "ct.dcm")) == StoreStatus.SUCCESS
        assert _count(db) == 1
        with db.session() as session:
            study = session.get(Study, str(ct.StudyInstanceUID))
            # Stored, but never analysed: no revision to analyse.
            assert study is not None and study.revision == 0
    finally:
        server.shutdown()


def _associates(settings: Settings, *, calling: str, called: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_calling_ae_allow_list_and_called_ae_at_association_time(
    settings: Settings, db: Database
) -> None:
    """Refused with A-ASSOCIATE-RJ before any data: a calling AE title not allowed, or a
    called AE title that is not the node's."""
    restricted = settings.model_copy(update={"calling_ae_whitelist": ["SCANNER1"]})
    server = start_listener(restricted, db, block=False)
    assert server is not None
    try:
        assert _associates(restricted, calling="SCANNER1", called=restricted.ae_title)
        assert not _associates(restricted, calling="TESTSCU", called=restricted.ae_title)
        assert not _associates(restricted, calling="SCANNER1", called="SOMEONEELSE")
    finally:
        server.shutdown()


def test_listeners_sharing_a_data_folder_sweep_only_their_own_transfers(tmp_path: Path) -> None:
    """Several listeners behind one address share the spool: each receives into its own
    folder, and a restarting one removes its partial files and only the stale ones of a
    listener that is gone, never a transfer another listener is running."""
    import os
    import time

    from node.spool import Spool

    incoming = tmp_path / "incoming"
    mine = Spool(tmp_path / "spool", incoming / "listener-a")
    running = incoming / "listener-b"
    gone = incoming / "listener-c"
    for folder in (running, gone):
        folder.mkdir(parents=True)
    (mine.incoming / "tmp1").write_bytes(b"partial")
    (running / "tmp2").write_bytes(b"being received")
    (gone / "tmp3").write_bytes(b"abandoned")
    (incoming / "tmp4").write_bytes(b"left by a listener of the one-folder layout")
    old = time.time() - 2 * 86400
    for path in (gone / "tmp3", incoming / "tmp4"):
        os.utime(path, (old, old))
    assert mine.sweep_incoming() == 3
    assert [p.name for p in incoming.glob("*/*")] == ["tmp2"]


def test_the_spool_commits_only_after_the_fsync_it_was_handed(tmp_path: Path) -> None:
    """The listener starts each file's fsync early (node.handlers); the commit waits for it,
    and a failed fsync leaves nothing in the spool. A copy already under the spool name
    (an attempt never indexed) is replaced only after the new file's fsync."""
    from concurrent.futures import Future

    from node.spool import Spool

    spool = Spool(tmp_path / "spool", tmp_path / "incoming")
    relative = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    temp = spool.incoming / "received.tmp"
    temp.write_bytes(b"dataset")

    failed: Future[None] = Future()
    failed.set_exception(OSError(5, "I/O error on fsync"))
    with pytest.raises(OSError, match="fsync"):
        spool.commit(temp, relative, data_synced=failed)
    assert temp.exists() and not (spool.root / relative).exists()

    done: Future[None] = Future()
    done.set_result(None)
    final = spool.commit(temp, relative, data_synced=done)
    assert final.read_bytes() == b"dataset" and not temp.exists()

    temp.write_bytes(b"resent")
    with pytest.raises(OSError, match="fsync"):
        spool.commit(temp, relative, data_synced=failed)
    assert final.read_bytes() == b"dataset" and temp.exists()
    spool.commit(temp, relative, data_synced=done)
    assert final.read_bytes() == b"resent" and not temp.exists()


def test_a_received_file_is_handed_to_the_disk_as_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 256 kB flushed, the kernel is asked to start writing the range (so the fsync
    before Success waits only for the tail); the ranges cover the file without overlap."""
    import node.receive as receive
    from node.spool import start_writeback

    calls: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        start_writeback(fd, offset, length)  # the real call too: it must not fail

    monkeypatch.setattr(receive, "start_writeback", record)
    with open(tmp_path / "received.dcm", "wb") as handle:
        guarded = receive.GuardedTempFile(handle, min_free=0)
        for _ in range(40):  # 40 fragments of 16 kB, flushed each (as pynetdicom does)
            guarded.write(b"\0" * 16384)
            guarded.file.flush()
        guarded.close()
    assert calls == [(0, 262144), (262144, 262144)]
    assert (tmp_path / "received.dcm").stat().st_size == 40 * 16384


def test_a_c_store_is_not_logged_line_by_line_at_info(
    listener: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom's per-message log handlers are off unless SONONODE_LOG_LEVEL=DEBUG: the
    listener's own line per association is what INFO shows."""
    import logging

    path = write(make_us_dataset(), tmp_path / "a.dcm")
    with caplog.at_level(logging.INFO):
        assert _send(listener, path) == 0x0000
    pynetdicom_lines = [r.getMessage() for r in caplog.records
                        if r.name.startswith("pynetdicom")]
    assert not [m for m in pynetdicom_lines if "Store Request" in m]
    assert any(m == "Association Accepted" for m in pynetdicom_lines)


@pytest.mark.parametrize("error", ["EXDEV", "EPERM"])
def test_the_spool_commits_where_a_hard_link_is_impossible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """Incoming folder on another file system (EXDEV: copied, then replaced) or a file
    system without hard links (EPERM: renamed after the fsync): the file arrives whole and
    the temporary name is gone."""
    import errno
    import os

    from node.spool import Spool

    def no_link(*_args: object) -> None:
        raise OSError(getattr(errno, error), os.strerror(getattr(errno, error)))

    monkeypatch.setattr(os, "link", no_link)
    spool = Spool(tmp_path / "spool", tmp_path / "incoming")
    temp = spool.incoming / "received.tmp"
    temp.write_bytes(b"dataset")
    final = spool.commit(temp, spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5"))
    assert final.read_bytes() == b"dataset" and not temp.exists()
    assert not list(final.parent.glob(".*.tmp"))
