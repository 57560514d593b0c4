"""For viewers that do not render SR: a destination marked ``?summary`` also gets a
Secondary Capture "AI summary" image and a Key Object Selection, in the source study,
each in its own series; dciodvfy finds no error in either, and Orthanc stores all three."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures import require_tools
from inprocess import InProcessNode, in_process_node
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from dicom_sr import read_sr
from dicom_sr.summary import KEY_OBJECTS_SERIES_DESCRIPTION, SUMMARY_SERIES_DESCRIPTION
from harness.peers import Orthanc, make_orthanc
from node.config import parse_destination
from node.db import Job
from simulator import simulate_study
from workers import pipeline

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

SCREENSHOT = Path("/tmp/sononode-ai-summary.png")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require_tools("Orthanc", "dciodvfy")
    peer = make_orthanc(tmp_path_factory.mktemp("orthanc"))
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def node(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    yield from in_process_node(
        tmp_path_factory.mktemp("node"),
        destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}?summary,"
                     f"PLAIN@127.0.0.1:{orthanc.dicom_port}")


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                          timeout=120, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def test_a_summary_destination_gets_the_sr_a_summary_image_and_key_objects(
    node: InProcessNode, orthanc: Orthanc, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    simulate_study(folder, seed=21, vendor="Northwind Medical", n_images=3, n_loops=1,
                   frames_per_loop=8)
    sources = sorted(folder.glob("*.dcm"))
    node.send(sources)
    sr_path = node.analyse()
    summary_path, kos_path = pipeline.companions(sr_path)
    assert _dciodvfy_errors(summary_path) == []
    assert _dciodvfy_errors(kos_path) == []

    with node.db.session() as session:
        job = session.scalars(select(Job).where(Job.sr_path == str(sr_path))).one()
        job_id, study_uid = job.id, job.study_instance_uid
    exports = pipeline.pending_exports(node.ctx, job_id)
    assert len(exports) == 2
    sent = [pipeline.run_export(node.ctx, export_id) for export_id in exports]
    assert all(outcome is not None for outcome in sent)

    stored = orthanc.find_instances(study_uid)
    series: dict[str, set[tuple[str | None, str]]] = {}
    for instance in stored:
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        series.setdefault(tags["SeriesInstanceUID"], set()).add(
            (tags.get("Modality"), tags.get("SeriesDescription", "")))
    source_series = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in sources}
    ai_series = {uid: kinds for uid, kinds in series.items() if uid not in source_series}
    kinds = sorted(next(iter(k)) for k in ai_series.values())
    assert len(ai_series) == 3, ai_series  # the SR, the summary and the KOS: own series each
    assert ("OT", SUMMARY_SERIES_DESCRIPTION) in kinds
    assert ("KO", KEY_OBJECTS_SERIES_DESCRIPTION) in kinds
    assert sum(1 for modality, _ in kinds if modality == "SR") == 1
    # The plain destination got the SR only; Orthanc keeps one copy of each object (the
    # sources went to the node, not to this PACS).
    assert len(stored) == 3

    # The key objects are the analysed images and the summary; the summary shows them.
    summary = read_sr(dcmread(sr_path))
    analysed = {uid for uid, im in summary.images.items() if im.view is not None}
    kos = dcmread(kos_path)
    flagged = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
               for item in kos.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")}
    picture = dcmread(summary_path)
    assert flagged == analysed | {str(picture.SOPInstanceUID)}
    assert picture.BurnedInAnnotation == "YES"
    assert picture.StudyInstanceUID == study_uid
    pixels = picture.pixel_array
    assert pixels.ndim == 3 and pixels.shape[1] == 1280 and pixels.shape[2] == 3
    # The banner is red and the key frames are drawn: the picture is not one colour.
    assert tuple(int(v) for v in pixels[5, 5]) == (150, 20, 20)
    assert float(np.std(pixels[200:, :, :].astype(float))) > 10.0
    Image.fromarray(pixels).save(SCREENSHOT)


def test_a_plain_destination_is_not_sent_the_summary() -> None:
    plain = parse_destination("PACS@pacs:104")
    assert not plain.summary
    both = parse_destination("PACS@pacs:104?tls&summary")
    assert both.summary and both.tls and str(both) == "PACS@pacs:104?tls&summary"
