"""The listener against broken and hostile peers, with DCMTK as the honest modality.

Every SOP class the node accepts is sent by DCMTK and stored; half-open connections, too
many connections from one address, addresses outside the allow-list, a deflate bomb and a
disk that fills during a receive are each answered without taking the listener down or
keeping a modality out.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from fixtures import make_us_dataset, require_tools, write
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import select

from harness.peers import dcmsend, dcmtk, wait_for
from node import receive
from node.config import Settings
from node.db import Database, Instance
from node.handlers import StoreStatus
from node.listener import GuardedServer, start_listener
from node.sop_classes import SOPClass

pytestmark = pytest.mark.timeout(180)

#: Modality each accepted class is sent with (documents come from the ultrasound system).
_MODALITY = {
    SOPClass.BASIC_TEXT_SR: "SR", SOPClass.ENHANCED_SR: "SR", SOPClass.COMPREHENSIVE_SR: "SR",
    SOPClass.COMPREHENSIVE_3D_SR: "SR", SOPClass.ENCAPSULATED_PDF: "DOC", SOPClass.GSPS: "PR",
}


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Short timeouts and a small per-peer limit, so that the tests wait seconds."""
    return settings.model_copy(update={"network_timeout_seconds": 2.0,
                                       "max_associations_per_peer": 4})


@pytest.fixture
def listener(fast: Settings, db: Database) -> Iterator[GuardedServer]:
    server = start_listener(fast, db, block=False)
    assert server is not None
    yield server
    server.shutdown()


def _echo(settings: Settings, *, host: str = "127.0.0.1") -> bool:
    """A real C-ECHO from DCMTK's echoscu (not pynetdicom's app of the same name)."""
    done = subprocess.run([dcmtk("echoscu"), "-to", "5", "-aec", settings.ae_title, host,
                           str(settings.dicom_port)], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.returncode == 0


def _stored(db: Database, sop_uid: str) -> bool:
    with db.session() as session:
        return session.scalar(select(Instance.sop_instance_uid).where(
            Instance.sop_instance_uid == sop_uid)) is not None


def _half_open(port: int, count: int, *, payload: bytes) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if payload:
            sock.sendall(payload)
        sockets.append(sock)
    return sockets


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.dcmtk
@pytest.mark.parametrize("sop_class", list(SOPClass), ids=lambda c: c.name)
def test_every_accepted_sop_class_is_stored_when_dcmtk_sends_it(
    sop_class: SOPClass, fast: Settings, db: Database, listener: GuardedServer, tmp_path: Path
) -> None:
    require_tools("dcmsend")
    ds = make_us_dataset(sop_class=sop_class.value, modality=_MODALITY.get(sop_class, "US"))
    path = write(ds, tmp_path / "instance.dcm")
    sent = dcmsend(fast.dicom_port, [path], aet=fast.ae_title, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _stored(db, str(ds.SOPInstanceUID))
    assert list(fast.incoming_dir.iterdir()) == []


@pytest.mark.dcmtk
def test_half_open_connections_are_closed_and_never_keep_a_modality_out(
    fast: Settings, db: Database
) -> None:
    """40 connections (more than the 32 associations allowed) that send the first 6 bytes
    of an A-ASSOCIATE-RQ and stop: echoscu still gets through while they are open, and each
    is closed within the ACSE timeout."""
    require_tools("echoscu")
    generous = fast.model_copy(update={"max_associations_per_peer": 64})
    server = start_listener(generous, db, block=False)
    assert server is not None
    header = bytes([0x01, 0x00]) + (1000).to_bytes(4, "big")
    hostile = [socket.create_connection(("127.0.0.1", generous.dicom_port), timeout=5,
                                        source_address=("127.0.0.2", 0))
               for _ in range(40)]
    try:
        for sock in hostile:
            sock.sendall(header)
        # More than the 32 associations allowed are held open at once...
        wait_for(lambda: server._peers.get("127.0.0.2", 0) > 32, timeout=10, interval=0.05,
                 what="more than 32 half-open connections held")
        # ... and a modality still gets through.
        assert _echo(generous)
        started = time.monotonic()
        wait_for(lambda: all(_closed_by_peer(s) for s in hostile), timeout=30,
                 what="half-open connections closed")
        assert time.monotonic() - started < 4 * generous.network_timeout_seconds
        assert _echo(generous)
    finally:
        for sock in hostile:
            sock.close()
        server.shutdown()


def test_connections_beyond_the_per_peer_limit_are_refused_at_accept(
    fast: Settings, listener: GuardedServer
) -> None:
    held = _half_open(fast.dicom_port, fast.max_associations_per_peer, payload=b"")
    try:
        wait_for(lambda: listener._peers.get("127.0.0.1") == fast.max_associations_per_peer,
                 timeout=10, what="held connections counted")
        (refused,) = _half_open(fast.dicom_port, 1, payload=b"")
        wait_for(lambda: _closed_by_peer(refused), timeout=5, what="refusal")
        refused.close()
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: "127.0.0.1" not in listener._peers, timeout=10, what="slots released")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", fast.dicom_port, ae_title=fast.ae_title)
    assert assoc.is_established
    assoc.release()


def test_addresses_outside_the_allow_list_are_refused(fast: Settings, db: Database) -> None:
    restricted = fast.model_copy(update={"allowed_peers": ["10.0.0.0/8"]})
    restricted = Settings.model_validate(restricted.model_dump())
    server = start_listener(restricted, db, block=False)
    assert server is not None
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assert not ae.associate("127.0.0.1", restricted.dicom_port,
                                ae_title=restricted.ae_title).is_established
    finally:
        server.shutdown()


def _deflate_bomb(path: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to about
    ``inflated_bytes`` (a private OB element of zeros): a few hundred kB on disk."""
    ds = make_us_dataset()
    ds.add_new(0x00091010, "LO", "BOMB")
    ds.add_new(0x00091011, "OB", b"\x00" * inflated_bytes)
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < inflated_bytes // 100
    return path


def test_a_deflate_bomb_is_refused_with_bounded_memory(
    fast: Settings, db: Database, tmp_path: Path
) -> None:
    limited = fast.model_copy(update={"max_inflated_bytes": 32 * 1024 * 1024})
    server = start_listener(limited, db, block=False)
    assert server is not None
    bomb = _deflate_bomb(tmp_path / "bomb.dcm", 256 * 1024 * 1024)
    # The guard itself never holds more than its buffers.
    with pytest.raises(receive.InflationLimitExceeded):
        receive.inflated_size(bomb, limited.max_inflated_bytes)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(dcmread(bomb, stop_before_pixels=True).SOPClassUID,
                                 [DeflatedExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", limited.dicom_port, ae_title=limited.ae_title)
        assert assoc.is_established
        # The file's bytes as they are: a sender of a bomb does not inflate it first.
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = assoc.send_c_store(bomb)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
        assert int(status.Status) == StoreStatus.CANNOT_UNDERSTAND
    finally:
        server.shutdown()
    assert not _stored(db, str(dcmread(bomb, stop_before_pixels=True).SOPInstanceUID))


def test_inflated_size_of_a_small_deflated_file(tmp_path: Path) -> None:
    path = _deflate_bomb(tmp_path / "small.dcm", 1024 * 1024)
    size = receive.inflated_size(path, 8 * 1024 * 1024)
    assert size is not None and 1024 * 1024 < size < 1200 * 1024
    plain = write(make_us_dataset(), tmp_path / "plain.dcm")
    assert receive.inflated_size(plain, 1024) is None
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        receive.inflated_size(truncated, 8 * 1024 * 1024)


class _FillsUp:
    """A file that takes ``room`` bytes and then fails with ENOSPC, as a full disk does."""

    def __init__(self, handle: IO[bytes], room: int) -> None:
        self._handle = handle
        self.name = handle.name
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(28, "No space left on device")
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, item: str) -> object:
        return getattr(self._handle, item)


def test_a_disk_that_fills_during_a_receive_answers_out_of_resources(
    fast: Settings, db: Database, listener: GuardedServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC half way through a large instance: 0xA700, nothing left in incoming/, and the
    next instance of the same association is stored once space is back."""
    import pynetdicom.dimse_messages as dimse_messages

    # node.receive replaced this module-level import of pynetdicom's, which it does not export.
    guarded = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
    original = guarded._original  # type: ignore[attr-defined]
    full = {"on": True}

    def factory(*args: object, **kwargs: object) -> object:
        handle = original(*args, **kwargs)
        return _FillsUp(handle, 200_000) if full["on"] else handle

    monkeypatch.setattr(guarded, "_original", factory, raising=False)
    receive.install_guarded_receive(min_free=fast.min_free_bytes)
    big = write(make_us_dataset(rows=1024, cols=1024), tmp_path / "big.dcm")
    small = write(make_us_dataset(), tmp_path / "small.dcm")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(dcmread(big, stop_before_pixels=True).SOPClassUID))
    assoc = ae.associate("127.0.0.1", fast.dicom_port, ae_title=fast.ae_title)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(big).Status) == StoreStatus.OUT_OF_RESOURCES
        assert list(fast.incoming_dir.iterdir()) == []
        full["on"] = False
        assert int(assoc.send_c_store(small).Status) == StoreStatus.SUCCESS
    finally:
        assoc.release()
        monkeypatch.undo()
        receive.install_guarded_receive(min_free=fast.min_free_bytes)
    assert not _stored(db, str(dcmread(big, stop_before_pixels=True).SOPInstanceUID))
    assert _stored(db, str(dcmread(small, stop_before_pixels=True).SOPInstanceUID))


@pytest.mark.dcmtk
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_real_full_filesystem(settings: Settings, tmp_path: Path) -> None:
    """The data directory on a 16 MiB tmpfs: DCMTK sends 24 MiB that do not fit, gets
    Out of Resources, and a small image in the same association is stored."""
    require_tools("dcmsend")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    from node.db import open_database

    try:
        tiny = settings.model_copy(update={"data_dir": mount, "min_free_bytes": 1024 * 1024})
        db = open_database(tiny.effective_database_url, tiny.data_dir)
        server = start_listener(tiny, db, block=False)
        assert server is not None
        try:
            big = write(make_us_dataset(rows=4096, cols=6144), tmp_path / "big.dcm")
            small = write(make_us_dataset(), tmp_path / "small.dcm")
            sent = dcmsend(tiny.dicom_port, [big, small], aet=tiny.ae_title, check=False)
            out = sent.stdout + sent.stderr
            assert _stored(db, str(dcmread(small, stop_before_pixels=True).SOPInstanceUID)), out
            assert not _stored(db, str(dcmread(big, stop_before_pixels=True).SOPInstanceUID))
            assert list(tiny.incoming_dir.iterdir()) == []
        finally:
            server.shutdown()
            db.dispose()
    finally:
        subprocess.run(["umount", str(mount)], check=False)
