"""Export (C-STORE SCU) against a real Orthanc and against SCPs that fail in known ways."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures import make_us_dataset, require_tools, write
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from harness.peers import get_port, running_orthanc, wait_for
from node.config import Destination
from workers.export import ExportRefusedError, ExportTransientError, send_file

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    return write(make_us_dataset(), tmp_path / "a.dcm")


def _scp(status: int) -> tuple[ThreadedAssociationServer, int]:
    port = get_port()
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.6.1",
                             ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    assert server is not None  # block=False returns the running server
    return server, port


@pytest.fixture
def scp_factory() -> Iterator[Callable[[int], int]]:
    servers: list[ThreadedAssociationServer] = []

    def make(status: int) -> int:
        server, port = _scp(status)
        servers.append(server)
        return port

    yield make
    for server in servers:
        server.shutdown()


def test_pacs_down_is_transient(instance: Path) -> None:
    with pytest.raises(ExportTransientError, match="cannot connect"):
        send_file(instance, Destination("PACS", "127.0.0.1", get_port()),
                  calling_ae_title="SONONODE", timeout_seconds=5)


def test_out_of_resources_is_transient(instance: Path, scp_factory: Callable[[int], int]) -> None:
    port = scp_factory(0xA700)
    with pytest.raises(ExportTransientError, match="out of resources"):
        send_file(instance, Destination("FAKEPACS", "127.0.0.1", port),
                  calling_ae_title="SONONODE", timeout_seconds=5)


def test_refusal_is_permanent(instance: Path, scp_factory: Callable[[int], int]) -> None:
    port = scp_factory(0xC211)
    with pytest.raises(ExportRefusedError, match="0xC211"):
        send_file(instance, Destination("FAKEPACS", "127.0.0.1", port),
                  calling_ae_title="SONONODE", timeout_seconds=5)


def test_warning_counts_as_stored(instance: Path, scp_factory: Callable[[int], int]) -> None:
    port = scp_factory(0xB000)
    assert send_file(instance, Destination("FAKEPACS", "127.0.0.1", port),
                     calling_ae_title="SONONODE", timeout_seconds=5) == 0xB000


@pytest.mark.orthanc
def test_send_to_orthanc(instance: Path, tmp_path: Path) -> None:
    require_tools("Orthanc")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        dest = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
        assert send_file(instance, dest, calling_ae_title="SONONODE") == 0
        study_uid = str(dcmread(instance).StudyInstanceUID)
        found = wait_for(lambda: orthanc.find_instances(study_uid), timeout=10,
                         what="instance in Orthanc")
        assert len(found) == 1
