"""DICOM TLS with real peers: DCMTK's echoscu/storescu into the node, the node into Orthanc.

A test CA, a server certificate (localhost, 127.0.0.1), a client certificate signed by the
CA and one from another CA are made with the ``openssl`` command line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures import make_us_dataset, require_tools, write
from pydicom import dcmread

from harness.peers import dcmtk, make_orthanc, wait_for
from node.config import Settings, parse_destination
from node.db import Database, Instance
from node.listener import start_listener
from node.tls import client_context
from workers.export import ExportTransientError, send_file

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(180)]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, ca: str, *, server: bool) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", subject, cwd=folder)
    ext = folder / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server
                   else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name,
             cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tools("openssl")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=sononode test {ca}",
                 cwd=folder)
    _issue(folder, "server", "/CN=localhost", "ca", server=True)
    _issue(folder, "client", "/CN=modality-01", "ca", server=False)
    _issue(folder, "rogue", "/CN=intruder", "rogue-ca", server=False)
    return Pki(ca=folder / "ca.pem", server_cert=folder / "server.pem",
               server_key=folder / "server.key", client_cert=folder / "client.pem",
               client_key=folder / "client.key", rogue_cert=folder / "rogue.pem",
               rogue_key=folder / "rogue.key")


def _tls_settings(settings: Settings, pki: Pki, *, mutual: bool) -> Settings:
    data = settings.model_dump()
    data.update(dicom_tls_cert=pki.server_cert, dicom_tls_key=pki.server_key,
                dicom_tls_ca=pki.ca if mutual else None, network_timeout_seconds=5.0)
    return Settings.model_validate(data)


@pytest.fixture(params=[False, True], ids=["server-auth", "mutual"])
def tls_node(request: pytest.FixtureRequest, settings: Settings, db: Database,
             pki: Pki) -> Iterator[Settings]:
    configured = _tls_settings(settings, pki, mutual=request.param)
    server = start_listener(configured, db, block=False)
    assert server is not None
    yield configured
    server.shutdown()


def _echo(settings: Settings, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-to", "5", *tls, "-aec", settings.ae_title,
                           "127.0.0.1", str(settings.dicom_port)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_dcmtk_over_tls(tls_node: Settings, db: Database, pki: Pki, tmp_path: Path) -> None:
    require_tools("echoscu", "storescu")
    mutual = tls_node.dicom_tls_ca is not None
    with_client = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    assert _echo(tls_node, *with_client).returncode == 0
    anonymous = _echo(tls_node, "--anonymous-tls", "+cf", str(pki.ca))
    assert (anonymous.returncode != 0) == mutual, anonymous.stderr
    rogue = _echo(tls_node, "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca))
    assert (rogue.returncode != 0) == mutual, rogue.stderr
    assert _echo(tls_node).returncode != 0  # plain TCP against the TLS port
    # The server's certificate is checked by the client: another CA's trust fails.
    other_ca = pki.ca.with_name("rogue-ca.pem")
    assert _echo(tls_node, *with_client[:3], "+cf", str(other_ca)).returncode != 0

    path = write(make_us_dataset(), tmp_path / "image.dcm")
    sent = subprocess.run([dcmtk("storescu"), *with_client, "-aec", tls_node.ae_title,
                           "127.0.0.1", str(tls_node.dicom_port), str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    with db.session() as session:
        assert session.get(Instance, str(dcmread(path).SOPInstanceUID)) is not None


def test_export_over_tls_to_orthanc(settings: Settings, pki: Pki, tmp_path: Path) -> None:
    """The node delivers to a PACS that requires TLS and a client certificate; without its
    CA (or to a plain destination) it does not."""
    require_tools("Orthanc")
    orthanc = make_orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_cert),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    })
    orthanc.start()
    try:
        node_settings = Settings.model_validate({
            **settings.model_dump(), "dicom_tls_cert": pki.client_cert,
            "dicom_tls_key": pki.client_key, "dicom_tls_ca": pki.ca})
        ds = make_us_dataset()
        path = write(ds, tmp_path / "image.dcm")
        destination = parse_destination(f"{orthanc.aet}@localhost:{orthanc.dicom_port}?tls")
        status = send_file(path, destination, calling_ae_title="SONONODE",
                           tls=client_context(node_settings))
        assert status == 0
        wait_for(lambda: orthanc.find_instances(str(ds.StudyInstanceUID)), timeout=30,
                 what="instance in Orthanc")
        with pytest.raises(ExportTransientError):
            send_file(path, parse_destination(f"{orthanc.aet}@localhost:{orthanc.dicom_port}"),
                      calling_ae_title="SONONODE", timeout_seconds=5)
    finally:
        orthanc.stop()


def test_tls_settings_are_validated(settings: Settings, pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings.model_validate({**settings.model_dump(), "dicom_tls_cert": pki.server_cert})
    with pytest.raises(ValueError, match="does not exist"):
        Settings.model_validate({**settings.model_dump(), "dicom_tls_cert": pki.ca.parent / "x",
                                 "dicom_tls_key": pki.server_key})

