"""End to end with real peers: DCMTK as the modality, Orthanc as the PACS, ``sononode up``.

A simulated ultrasound study goes in with ``dcmsend``; the SR must come out in Orthanc,
in the same study, referencing every source image, passing ``dciodvfy`` and showing the
view, the finding and its probability in ``dsrdump``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures import require_tools
from pydicom import Dataset, dcmread

from dicom_sr.reader import read_sr
from harness.databases import create_postgres, drop_postgres
from harness.peers import Node, Orthanc, dcmsend, make_orthanc, start_node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.dcmtk,
              pytest.mark.timeout(600)]

SR_TIMEOUT = 180.0


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    require_tools("dcmsend", "dsrdump", "dciodvfy", "Orthanc")


@pytest.fixture(scope="module", params=["embedded", "redis-postgres"])
def node(request: pytest.FixtureRequest, orthanc: Orthanc,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    extra: dict[str, str] = {}
    database_url = None
    if request.param == "redis-postgres":
        database_url = create_postgres()
        # A database number of its own on the shared server, flushed first.
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=7).flushdb()
        extra = {"SONONODE_BROKER_URL": "redis://127.0.0.1:6379/7",
                 "SONONODE_DATABASE_URL": database_url}
    running = start_node(tmp_path_factory.mktemp(f"node-{request.param}") / "data",
                         destinations=orthanc.destination, extra_env=extra)
    yield running
    running.stop()
    if database_url:
        drop_postgres(database_url)


@pytest.fixture
def seed_base(request: pytest.FixtureRequest) -> int:
    """Distinct simulated studies for each node flavour: the PACS is shared by both, and a
    study UID already holding an SR from the other flavour would satisfy the wait."""
    return {"embedded": 0, "redis-postgres": 1000}[request.node.callspec.params["node"]]


def _simulate(out: Path, *, seed: int, n_images: int = 4, n_loops: int = 1,
              vendor: str | None = None) -> tuple[str, list[Path]]:
    from simulator import VENDOR_STYLES, simulate_study

    vendor = vendor or sorted(VENDOR_STYLES)[seed % len(VENDOR_STYLES)]
    study = simulate_study(out, seed=seed, vendor=vendor, n_images=n_images, n_loops=n_loops,
                           frames_per_loop=12)
    files = sorted(out.glob("**/*.dcm"))
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study is not None
    return study_uid, files


def _srs(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return [i for i in orthanc.find_instances(study_uid)
            if i["MainDicomTags"].get("SOPInstanceUID") and
            _is_sr(orthanc, i["ID"])]


def _is_sr(orthanc: Orthanc, orthanc_id: str) -> bool:
    tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
    return tags.get("Modality") == "SR"


def _wait_srs(orthanc: Orthanc, study_uid: str, count: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        srs = _srs(orthanc, study_uid)
        return srs if len(srs) >= count else None

    return wait_for(enough, timeout=SR_TIMEOUT, interval=0.5, what=f"{count} SR(s) in Orthanc")


def _check_sr(path: Path, source_files: list[Path]) -> None:
    """dciodvfy clean, dsrdump shows view/finding/probability, every source referenced."""
    verify = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (verify.stdout + verify.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True).stdout
    ds = dcmread(path)
    summary = read_sr(ds)
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in source_files}
    assert set(summary.evidence) == sources
    assert set(summary.images) == sources
    views = [img.view for img in summary.images.values() if img.view is not None]
    assert views, "no view in the SR"
    shown = [v for v in views if not v.abstained]
    assert shown, "every view withheld"
    assert all(v.code is not None and v.code.meaning in dump for v in shown)
    assert all(v.probability is not None and 0.0 <= v.probability <= 1.0 for v in shown)
    findings = [img.finding for img in summary.images.values() if img.finding is not None]
    assert findings, "no finding in the SR"
    assert "probability" in dump.lower()
    assert "finding" in dump.lower()
    # Every algorithm name carries the simulated-data disclaimer exactly once.
    names = [item.TextValue for item in _content_items(ds)
             if item.get("ValueType") == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert names and all(n.lower().count("not for clinical use") == 1 for n in names), names


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_study_to_sr_in_pacs(node: Node, orthanc: Orthanc, tmp_path: Path,
                             seed_base: int) -> None:
    study_uid, files = _simulate(tmp_path / "study", seed=seed_base + 11)
    dcmsend(node.dicom_port, files)
    srs = _wait_srs(orthanc, study_uid, 1)
    assert len(srs) == 1
    sr_path = orthanc.download(srs[0]["ID"], tmp_path / "sr.dcm")
    ds = dcmread(sr_path)
    assert ds.StudyInstanceUID == study_uid
    assert ds.PatientID == dcmread(files[0], stop_before_pixels=True).PatientID
    assert ds.SeriesInstanceUID not in {
        str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
    _check_sr(sr_path, files)
    # The API tells the same story (the export task records the SR as sent a moment after
    # the PACS answered).
    wait_for(lambda: node.get(f"/studies/{study_uid}")["state"] == "exported", timeout=30,
             what="the study exported")
    study = node.get(f"/studies/{study_uid}")
    assert study["state"] == "exported"
    assert study["jobs"][-1]["exports"][0]["state"] == "sent"
    assert len(study["instances"]) == len(files)
    metrics = node.get_text("/metrics")
    # The audit trail tells who sent it, what analysed it and where the SR went.
    events = node.get(f"/audit?study={study_uid}")["events"]
    actions = {e["action"]: e for e in events}
    assert {"received", "analysed", "reported", "exported", "api"} <= set(actions)
    assert actions["received"]["actor"].startswith("dicom:MODALITY@127.0.0.1")
    assert all(len(p["sha256"]) == 64 for p in actions["analysed"]["detail"]["packs"])
    assert actions["exported"]["detail"]["destination"] == orthanc.destination
    # Nobody gets in without a token: patient data, metrics, actions.
    for path in ("/studies", f"/studies/{study_uid}", "/metrics", "/exports"):
        assert httpx.get(node.url + path, timeout=10).status_code == 401, path
    assert "sononode_instances_received_total" in metrics
    assert "sononode_task_seconds_bucket" in metrics
    assert 'sononode_queue_depth{queue="gpu"}' in metrics
    # The study's vendor has a drift stream per pack, and the gauges say the same.
    manufacturer = str(dcmread(files[0], stop_before_pixels=True).Manufacturer)
    vendor = " ".join(manufacturer.lower().split())
    streams = [s for s in node.get("/drift")["streams"] if s["vendor"] == vendor]
    assert streams and all(s["studies"] >= 1 for s in streams)
    for stream in streams:
        labels = (f'model="{stream["model"]}",scanner="{stream["scanner"]}",'
                  f'vendor="{vendor}"')
        expected = 1.0 if stream["status"] == "alert" else 0.0
        assert f"sononode_drift_alert{{{labels}}} {expected}" in metrics


def test_resend_is_stored_once_and_late_instance_supersedes(node: Node, orthanc: Orthanc,
                                                            tmp_path: Path,
                                                            seed_base: int) -> None:
    study_uid, files = _simulate(tmp_path / "study", seed=seed_base + 12, n_images=3,
                                 n_loops=0)
    dcmsend(node.dicom_port, files[:2])
    first = _wait_srs(orthanc, study_uid, 1)
    # Re-sent instance: stored once, no re-analysis.
    dcmsend(node.dicom_port, files[:1])
    # New instance after completion: a superseding SR in the same AI series.
    dcmsend(node.dicom_port, files[2:])
    srs = _wait_srs(orthanc, study_uid, 2)
    assert len(srs) == 2
    study = node.get(f"/studies/{study_uid}")
    assert len(study["instances"]) == 3
    assert len(study["jobs"]) == 2
    paths = [orthanc.download(sr["ID"], tmp_path / f"sr{i}.dcm") for i, sr in enumerate(srs)]
    datasets = sorted((dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    old, new = datasets
    assert old.SeriesInstanceUID == new.SeriesInstanceUID
    assert old.SOPInstanceUID != new.SOPInstanceUID
    predecessors = [ref.ReferencedSOPInstanceUID
                    for study_ref in new.PredecessorDocumentsSequence
                    for series in study_ref.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence]
    assert predecessors == [old.SOPInstanceUID]
    _check_sr(paths[[str(d.SOPInstanceUID) for d in map(dcmread, paths)]
                    .index(str(new.SOPInstanceUID))], files)
    assert first


def test_reanalysis_supersedes_and_counts_once_in_drift(node: Node, orthanc: Orthanc,
                                                        tmp_path: Path, seed_base: int) -> None:
    study_uid, files = _simulate(tmp_path / "study", seed=seed_base + 14, n_images=2,
                                 n_loops=0)
    dcmsend(node.dicom_port, files)
    _wait_srs(orthanc, study_uid, 1)
    wait_for(lambda: node.get(f"/studies/{study_uid}")["state"] == "exported",
             timeout=SR_TIMEOUT, what="study exported")
    before = {(s["vendor"], s["model"]): s["studies"] for s in node.get("/drift")["streams"]}
    response = node.post(f"/studies/{study_uid}/reanalyse")
    assert response.status_code == 202, response.text
    assert response.json()["dispatched"] is True
    srs = _wait_srs(orthanc, study_uid, 2)
    datasets = sorted((dcmread(orthanc.download(sr["ID"], tmp_path / f"sr{i}.dcm"))
                       for i, sr in enumerate(srs)), key=lambda d: int(d.InstanceNumber))
    old, new = datasets
    predecessors = [ref.ReferencedSOPInstanceUID
                    for study_ref in new.PredecessorDocumentsSequence
                    for series in study_ref.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence]
    assert predecessors == [old.SOPInstanceUID]
    after = {(s["vendor"], s["model"]): s["studies"] for s in node.get("/drift")["streams"]}
    assert after == before  # the same study is not counted twice
    # An unknown study is a 404, not a new job.
    assert node.post("/studies/1.2.3.999/reanalyse").status_code == 404
    events = node.get(f"/audit?study={study_uid}&action=reanalyse")["events"]
    assert len(events) == 1


def test_blank_study_gets_a_not_assessable_sr(node: Node, orthanc: Orthanc, tmp_path: Path,
                                              seed_base: int) -> None:
    """Probe in air on every image: no finding, an SR that says "not assessable" and why."""
    study_uid, files = _simulate(tmp_path / "study", seed=seed_base + 15, n_images=2,
                                 n_loops=0)
    for path in files:
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.PixelData = bytes(len(ds.PixelData))  # an all-black frame, headers untouched
        ds.save_as(path, enforce_file_format=True)
    dcmsend(node.dicom_port, files)
    srs = _wait_srs(orthanc, study_uid, 1)
    sr_path = orthanc.download(srs[0]["ID"], tmp_path / "sr.dcm")
    verify = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True)
    errors = [line for line in (verify.stdout + verify.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    summary = read_sr(dcmread(sr_path))
    assert not summary.assessable
    assert summary.needs_review
    assert summary.not_assessable_reasons
    assert all(img.finding is None or img.finding.abstained for img in summary.images.values())
    assert {img.qc_outcome.value for img in summary.images.values() if img.qc_outcome} == {"fail"}
    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True).stdout
    assert "not assessable" in dump.lower()


@pytest.mark.timeout(600)
def test_pacs_down_then_back(tmp_path: Path) -> None:
    pacs = make_orthanc(tmp_path / "late-orthanc")  # configured, not started: PACS down
    running = start_node(tmp_path / "data", destinations=pacs.destination)
    try:
        study_uid, files = _simulate(tmp_path / "study", seed=13, n_images=2, n_loops=0)
        dcmsend(running.dicom_port, files)

        def retrying() -> bool:
            study = running.get(f"/studies/{study_uid}")
            exports = study["jobs"][-1]["exports"] if study["jobs"] else []
            return bool(exports) and exports[0]["state"] == "retrying"

        wait_for(retrying, timeout=SR_TIMEOUT, what="export retrying while the PACS is down")
        pacs.start()
        srs = _wait_srs(pacs, study_uid, 1)
        assert len(srs) == 1
        export = running.get(f"/studies/{study_uid}")["jobs"][-1]["exports"][0]
        assert export["state"] == "sent" and export["attempts"] >= 2
    finally:
        running.stop()
        pacs.stop()


@pytest.mark.timeout(600)
def test_dead_letter_and_replay(tmp_path: Path) -> None:
    pacs = make_orthanc(tmp_path / "dead-orthanc")
    running = start_node(tmp_path / "data", destinations=pacs.destination,
                         extra_env={"SONONODE_EXPORT_MAX_RETRIES": "1"})
    try:
        study_uid, files = _simulate(tmp_path / "study", seed=14, n_images=2, n_loops=0)
        dcmsend(running.dicom_port, files)
        dead = wait_for(lambda: running.get("/exports?state=dead")["exports"],
                        timeout=SR_TIMEOUT, what="dead-lettered export")
        assert dead[0]["study_instance_uid"] == study_uid
        pacs.start()
        response = running.post(f"/exports/{dead[0]['id']}/replay")
        assert response.status_code == 202
        assert len(_wait_srs(pacs, study_uid, 1)) == 1
        wait_for(lambda: running.get(f"/studies/{study_uid}")["state"] == "exported",
                 timeout=30, what="study exported after replay")
    finally:
        running.stop()
        pacs.stop()
