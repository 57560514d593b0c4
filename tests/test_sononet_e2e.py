"""SonoNet-16 through the whole node: example frames in as Ultrasound DICOM, planes out in the SR.

Every example frame of ``../shared/sononet/example_images`` (the file name is its true plane)
is wrapped into an RGB Ultrasound Image Storage instance with the header a scanner writes,
sent by DCMTK's ``dcmsend`` to ``sononode up`` running only the SonoNet pack (imported with
``sononode model import-sononet``), and must come back from the Orthanc PACS in a valid SR
(``dciodvfy``) with its plane, a region localising it inside the ultrasound image, and an
out-of-distribution score below the pack's threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from fixtures import require_tools
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_sr.reader import SRSummary, read_sr
from harness.peers import Node, Orthanc, dcmsend, start_node, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.orthanc,
    pytest.mark.dcmtk,
    pytest.mark.sononet,
    pytest.mark.timeout(600),
]

SONONET_DIR = Path(
    os.environ.get(
        "SONONODE_SONONET_DIR", Path(__file__).resolve().parents[2] / "shared" / "sononet"
    )
)
NPZ = SONONET_DIR / "SonoNet16.npz"
EXAMPLES = SONONET_DIR / "example_images"
#: Example file stem -> SonoNet label (the file name is the true plane).
EXPECTED = {
    "4CH": "4CH",
    "BRAIN-TV": "Brain (Tv.)",
    "KIDNEYS": "Kidneys",
    "PROFILE": "Profile",
    "SPINE-CORONAL": "Spine (cor.)",
}
US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
SR_TIMEOUT = 240.0

if not (NPZ.is_file() and all((EXAMPLES / f"{n}.tiff").is_file() for n in EXPECTED)):
    pytest.skip(
        f"SonoNet weights and example frames not found in {SONONET_DIR} "
        "(set SONONODE_SONONET_DIR)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    require_tools("dcmsend", "dciodvfy", "Orthanc")


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SonoNet pack as a hospital makes it: the CLI, on the published weights."""
    out = tmp_path_factory.mktemp("packs") / "sononet16"
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "model", "import-sononet", str(NPZ), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def node(pack: Path, orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    running = start_node(
        tmp_path_factory.mktemp("node") / "data",
        destinations=orthanc.destination,
        extra_env={"SONONODE_MODEL_PACKS": str(pack)},
    )
    yield running
    running.stop()


def _us_instance(
    rgb: np.ndarray, *, study: Dataset, series_uid: str, number: int, name: str
) -> Dataset:
    """An RGB Ultrasound Image Storage instance of one screen capture, as a scanner sends it."""
    now = datetime(2016, 4, 1, 9, 15, number)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        setattr(ds, keyword, getattr(study, keyword))
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "OB 2nd trimester"
    ds.BodyPartExamined = "ABDOMEN"
    # The example frames are screen captures of this scanner (see the weights' README).
    ds.Manufacturer = "GE Healthcare"
    ds.ManufacturerModelName = "Voluson E8"
    ds.SoftwareVersions = "BT15"
    ds.StationName = "US-OB-1"
    ds.InstitutionName = "Test Hospital"
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OBSTETRICAL", "0001"]
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    ds.ImageComments = f"example frame {name}"
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _study(out: Path) -> tuple[str, dict[str, Path]]:
    """Write the example frames as one study; returns its UID and file per example."""
    from PIL import Image

    study = Dataset()
    study.PatientName = "Example^Fetal"
    study.PatientID = "SONONET-E2E"
    study.PatientBirthDate = "19900101"
    study.PatientSex = "F"
    study.StudyInstanceUID = generate_uid()
    study.StudyDate = "20160401"
    study.StudyTime = "091500"
    study.StudyID = "1"
    study.AccessionNumber = "ACC-SN16"
    study.ReferringPhysicianName = ""
    study.StudyDescription = "US OB 2nd trimester anomaly scan"
    series_uid = generate_uid()
    out.mkdir(parents=True)
    files = {}
    for number, name in enumerate(EXPECTED, start=1):
        with Image.open(EXAMPLES / f"{name}.tiff") as image:
            rgb = np.asarray(image.convert("RGB"))
        ds = _us_instance(rgb, study=study, series_uid=series_uid, number=number, name=name)
        files[name] = out / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    return str(study.StudyInstanceUID), files


def _wait_sr(orthanc: Orthanc, study_uid: str) -> str:
    def sr_id() -> str | None:
        for item in orthanc.find_instances(study_uid, modality="SR"):
            return str(item["ID"])
        return None

    return wait_for(sr_id, timeout=SR_TIMEOUT, interval=0.5, what="the SonoNet SR in Orthanc")


def test_example_planes_come_back_in_the_sr(
    node: Node, orthanc: Orthanc, pack: Path, tmp_path: Path
) -> None:
    from workers.models.sononet import LABEL_CODES, SonoNetLabel

    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["ood"]["method"] == "energy"
    assert "example frame" in manifest["ood"]["fitted_on"]

    study_uid, files = _study(tmp_path / "study")
    dcmsend(node.dicom_port, list(files.values()))
    sr_path = orthanc.download(_wait_sr(orthanc, study_uid), tmp_path / "sr.dcm")

    verify = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True)
    errors = [line for line in (verify.stdout + verify.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "\n".join(errors)

    summary: SRSummary = read_sr(dcmread(sr_path))
    assert summary.study_instance_uid == study_uid
    assert [a.name for a in summary.algorithms] == ["sononet16"]
    assert not summary.simulated_training_data
    for name, path in files.items():
        source = dcmread(path, stop_before_pixels=True)
        image = summary.images[str(source.SOPInstanceUID)]
        expected = LABEL_CODES[SonoNetLabel(EXPECTED[name])]
        view = image.view
        assert view is not None and not view.abstained, f"{name}: view withheld ({view})"
        assert view.code is not None
        assert (view.code.value, view.code.scheme, view.code.meaning) == (
            expected.value, expected.scheme, expected.meaning), name
        assert view.probability is not None and view.probability > 0.5, name
        # The class map localises the plane inside the ultrasound image, not the whole frame.
        assert image.region is not None, name
        c0, r0, c1, r1 = image.region
        assert 0 <= c0 < c1 <= source.Columns and 0 <= r0 < r1 <= source.Rows, name
        assert (c1 - c0) * (r1 - r0) < 0.5 * source.Columns * source.Rows, name
        assert r0 > 60, f"{name}: region {image.region} reaches into the scanner's title bar"
        assert image.ood_score is not None and not image.out_of_distribution, name
        assert image.ood_score < manifest["ood"]["threshold"], name
        assert not image.needs_review, f"{name}: {image.review_reasons}"
