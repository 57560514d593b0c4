"""Every transfer syntax a vendor may send is received over DICOM and decoded.

Fixtures: an ultrasound frame, encoded with DCMTK (`dcmconv`, `dcmcjpeg`, `dcmcjpls`,
`dcmcrle`) and pydicom's encoders (JPEG 2000 via openjpeg). Compressed files go over
`dcmsend`, which proposes each file's own transfer syntax. An uncompressed file may
legitimately travel in any uncompressed syntax (dcmsend offers several and the SCP picks),
so those and deflate go over DCMTK's `storescu` with that syntax proposed first. The
stored file is decoded by the workers' pixel decoder and compared with the original.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import make_us_dataset, require_tools, write
from pydicom import dcmread
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from harness.peers import dcmsend
from node.config import Settings
from node.db import Database, Instance
from node.listener import start_listener
from workers.imaging.pixels import load_instance

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(300)]

#: name -> (transfer syntax UID, how to make it from the uncompressed file, lossless?)
#: DCMTK storescu option that proposes the syntax first (the uncompressed family and deflate).
STORESCU_PROPOSE = {"implicit_le": "-xi", "explicit_le": "-xe", "deflated": "-xd"}
#: Sent by pynetdicom proposing only this syntax: a sender offering big endian also offers
#: little endian, which the node prefers; this checks that big endian alone is accepted too.
PYNETDICOM_ONLY = {"explicit_be"}
#: DCMTK's storescu (pynetdicom installs a Python script of the same name on PATH).
STORESCU = next((p for p in ("/usr/bin/storescu", "/bin/storescu") if Path(p).exists()),
                "storescu")

SYNTAXES: dict[str, tuple[str, list[str] | str, bool]] = {
    "implicit_le": ("1.2.840.10008.1.2", ["dcmconv", "+ti"], True),
    "explicit_le": ("1.2.840.10008.1.2.1", ["dcmconv", "+te"], True),
    "explicit_be": ("1.2.840.10008.1.2.2", ["dcmconv", "+tb"], True),
    "deflated": ("1.2.840.10008.1.2.1.99", ["dcmconv", "+td"], True),
    "jpeg_baseline": ("1.2.840.10008.1.2.4.50", ["dcmcjpeg", "+eb"], False),
    "jpeg_extended": ("1.2.840.10008.1.2.4.51", ["dcmcjpeg", "+ee"], False),
    "jpeg_lossless_p14": ("1.2.840.10008.1.2.4.57", ["dcmcjpeg", "+el"], True),
    "jpeg_lossless_sv1": ("1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"], True),
    "jpegls_lossless": ("1.2.840.10008.1.2.4.80", ["dcmcjpls", "+el"], True),
    "jpegls_near_lossless": ("1.2.840.10008.1.2.4.81", ["dcmcjpls", "+en"], False),
    "jpeg2000_lossless": (str(JPEG2000Lossless), "pydicom", True),
    "jpeg2000": (str(JPEG2000), "pydicom", False),
    "rle": ("1.2.840.10008.1.2.5", ["dcmcrle"], True),
}


def _ultrasound_like(rows: int = 120, cols: int = 160) -> np.ndarray:
    """A smooth sector with speckle-like texture (compresses like ultrasound, not noise)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:rows, 0:cols]
    radius = np.hypot(x - cols / 2, y + 10)
    sector = (np.abs(np.arctan2(x - cols / 2, y + 10)) < 0.6) & (radius < rows)
    speckle = rng.rayleigh(40, (rows, cols))
    image = np.clip(40 + 0.5 * speckle + 30 * np.sin(radius / 9), 0, 255) * sector
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def originals(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    require_tools("dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmsend")
    folder = tmp_path_factory.mktemp("syntaxes")
    pixels = _ultrasound_like()
    study_uid = generate_uid()
    files: dict[str, Path] = {}
    for name, (uid, how, _) in SYNTAXES.items():
        ds = make_us_dataset(study_uid=study_uid, rows=pixels.shape[0], cols=pixels.shape[1])
        ds.PixelData = pixels.tobytes()
        source = write(ds, folder / f"{name}-src.dcm")
        target = folder / f"{name}.dcm"
        if how == "pydicom":
            encoded = dcmread(source)
            if uid == str(JPEG2000):
                encoded.compress(uid, j2k_psnr=[60])
            else:
                encoded.compress(uid)
            encoded.save_as(target, enforce_file_format=True)
        else:
            subprocess.run([*how, str(source), str(target)], check=True, capture_output=True)
        assert str(dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID) == uid
        files[name] = target
    yield folder, {"pixels": pixels, "files": files}


def _send_only_its_syntax(settings: Settings, path: Path) -> None:
    ds = dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000, f"{path.name}: status 0x{status.Status:04X}"


def test_every_syntax_received_and_decoded(originals: tuple[Path, dict[str, Any]],
                                           settings: Settings, db: Database) -> None:
    _, data = originals
    server = start_listener(settings, db, block=False)
    assert server is not None
    try:
        for name, option in STORESCU_PROPOSE.items():
            sent = subprocess.run(
                [STORESCU, option, "-aec", settings.ae_title, "-aet", "MODALITY", "127.0.0.1",
                 str(settings.dicom_port), str(data["files"][name])],
                capture_output=True, text=True, timeout=120,
            )
            assert sent.returncode == 0, f"{name}: storescu failed: {sent.stderr}"
        for name in PYNETDICOM_ONLY:
            _send_only_its_syntax(settings, data["files"][name])
        dcmsend(settings.dicom_port,
                [path for name, path in data["files"].items()
                 if name not in STORESCU_PROPOSE and name not in PYNETDICOM_ONLY])
    finally:
        server.shutdown()
    with db.session() as session:
        stored = {row.sop_instance_uid: row for row in session.scalars(select(Instance)).all()}
    assert len(stored) == len(SYNTAXES)
    for name, path in data["files"].items():
        uid, _, lossless = SYNTAXES[name]
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = stored[sop]
        mismatched = {n: (SYNTAXES[n][0], stored[str(dcmread(p, stop_before_pixels=True)
                                                   .SOPInstanceUID)].transfer_syntax_uid)
                      for n, p in data["files"].items()}
        assert row.transfer_syntax_uid == uid, {n: v for n, v in mismatched.items()
                                                if v[0] != v[1]}
        decoded = load_instance(settings.spool_dir / row.path)
        grey = decoded.frames[0, :, :, 0].astype(int)
        difference = np.abs(grey - data["pixels"].astype(int))
        if lossless:
            assert difference.max() == 0, f"{name}: lossless syntax changed pixels"
        else:
            assert difference.mean() < 4.0, f"{name}: mean error {difference.mean():.2f}"
