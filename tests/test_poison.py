"""Malformed instances from real peers never cost their study its report.

Each instance goes to the real listener over DICOM (pynetdicom sends its bytes as they
are) beside valid images of the same study; the job stages then run in-process. A
malformed instance is either refused with a failure status (and nothing of it is kept) or
accepted and reported as not assessable, while the valid images are analysed and the
study gets its SR.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import InProcessNode, in_process_node
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_sr.model import QCOutcome
from dicom_sr.reader import read_sr
from harness.poison import POISONS
from node.db import Instance, Job, JobState
from node.scheduler import Dispatcher, start_complete_studies
from node.sop_classes import is_analysed
from simulator import simulate_study
from workers import pipeline

pytestmark = pytest.mark.timeout(300)

VENDOR = "Northwind Medical"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Two valid stills of one simulated study (copied per test, with new UIDs)."""
    folder = tmp_path_factory.mktemp("valid")
    simulate_study(folder, seed=5, vendor=VENDOR, n_images=2, n_loops=0)
    return [dcmread(p) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    yield from in_process_node(tmp_path_factory.mktemp("node"))


def _study(valid: list[Dataset], folder: Path) -> tuple[str, list[Path]]:
    """The valid stills as a new study (new UIDs), written to ``folder``."""
    study_uid = generate_uid()
    paths = []
    for i, ds in enumerate(valid):
        copy = ds.copy()
        copy.StudyInstanceUID = study_uid
        copy.SOPInstanceUID = generate_uid()
        file_meta = ds.file_meta.copy()
        assert isinstance(file_meta, FileMetaDataset)  # a shallow copy keeps the class
        copy.file_meta = file_meta
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        path = folder / f"valid{i}.dcm"
        copy.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def _send(node: InProcessNode, paths: list[Path]) -> list[int | None]:
    """C-STORE the files' bytes as they are, in one association; the statuses."""
    headers = [dcmread(p, stop_before_pixels=True, force=True) for p in paths]
    ae = AE(ae_title="MODALITY")
    for ds in headers:
        ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID,
                                 [ds.file_meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: list[int | None] = []
    try:
        assoc = ae.associate("127.0.0.1", node.settings.dicom_port,
                             ae_title=node.settings.ae_title)
        assert assoc.is_established
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if status and "Status" in status else None)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def _analyse(node: InProcessNode, study_uid: str) -> Dataset:
    """Run the study's job through QC, inference and the report; the SR."""
    jobs: list[int] = []
    dispatcher = Dispatcher(job=lambda job_id, _state: jobs.append(job_id),
                            export=lambda _export_id: None)
    start_complete_studies(node.db, dispatcher, stable_seconds=0)
    assert len(jobs) == 1
    (job_id,) = jobs
    pipeline.run_qc(node.ctx, job_id)
    pipeline.run_inference(node.ctx, job_id)
    assert pipeline.run_report(node.ctx, job_id) is not None
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.DONE, job.error if job else None
        assert job.sr_path is not None
        return dcmread(job.sr_path)


def _check(node: InProcessNode, study_uid: str, valid_paths: list[Path], bad: Path,
           status: int | None) -> None:
    bad_uid = str(dcmread(bad, stop_before_pixels=True, force=True).SOPInstanceUID)
    assert list(node.settings.incoming_dir.iterdir()) == [], "a received file leaked"
    summary = read_sr(_analyse(node, study_uid))
    for path in valid_paths:
        image = summary.images[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        assert image.view is not None, "a valid image lost its analysis"
    with node.db.session() as session:
        kept = {row.sop_instance_uid: row for row in session.scalars(
            select(Instance).where(Instance.study_instance_uid == study_uid)).all()}
    if status == 0:
        assert bad_uid in kept
        if bad_uid not in summary.images:
            # Stored, not analysed: its header no longer says it is an ultrasound image.
            row = kept[bad_uid]
            assert not is_analysed(row.sop_class_uid, row.modality)
            return
        image = summary.images[bad_uid]
        if image.qc_outcome is QCOutcome.FAIL:
            assert image.qc_reasons and image.needs_review
    else:
        assert status is not None and status >= 0xA000, f"no failure status: {status}"
        assert bad_uid not in kept


@pytest.mark.parametrize("name", sorted(POISONS))
def test_a_poisoned_instance_never_costs_its_study_the_report(
    name: str, node: InProcessNode, valid: list[Dataset], tmp_path: Path
) -> None:
    study_uid, paths = _study(valid, tmp_path)
    poisoned = POISONS[name](dcmread(paths[0]))
    # First in its series: the report copies the patient and study modules from it.
    poisoned.InstanceNumber = 0
    bad = tmp_path / f"{name}.dcm"
    poisoned.save_as(bad, enforce_file_format=True)
    statuses = _send(node, [*paths, bad])
    assert statuses[:-1] == [0] * len(paths)
    _check(node, study_uid, paths, bad, statuses[-1])


#: How an element's encoded value is mutated (VR kept, or changed).
_MUTATIONS = ("bytes", "vr", "empty", "multi", "long")
_VRS = ("US", "SS", "UL", "LO", "SH", "CS", "DS", "IS", "UI", "OB", "PN", "DA", "FL", "FD", "AT")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(
    st.tuples(st.integers(min_value=0), st.sampled_from(_MUTATIONS), st.sampled_from(_VRS),
              st.binary(min_size=1, max_size=16)),
    min_size=1, max_size=3))
def test_fuzzed_headers_never_cost_a_study_its_report(
    edits: list[tuple[int, str, str, bytes]], node: InProcessNode, valid: list[Dataset],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    study_uid, paths = _study(valid, folder)
    target = dcmread(paths[0])
    target.SOPInstanceUID = generate_uid()
    target.file_meta.MediaStorageSOPInstanceUID = target.SOPInstanceUID
    target.InstanceNumber = 0  # first: the report copies the patient and study from it
    protected = {0x00080016, 0x00080018, 0x0020000D}
    for index, mutation, vr, payload in edits:
        tags = [t for t in target.keys()  # noqa: SIM118 (a Dataset iterates elements)
                if t.group not in (0x0002, 0x7FE0) and t not in protected]
        tag = BaseTag(tags[index % len(tags)])
        element = target[tag]
        new_vr = element.VR if mutation != "vr" and element.VR != "SQ" else vr
        value = {"bytes": payload, "vr": b"12\\34", "empty": b"", "multi": b"1\\2\\3",
                 "long": b"9" * 80}[mutation]
        if len(value) % 2:
            value += b" "
        target._dict[tag] = RawDataElement(tag, new_vr, len(value), value, 0, False, True)
    bad = folder / "fuzzed.dcm"
    try:
        target.save_as(bad, enforce_file_format=False)
    except Exception:
        return  # pydicom cannot even write it: no peer could send it either
    statuses = _send(node, [*paths, bad])
    assert statuses[:-1] == [0] * len(paths)
    _check(node, study_uid, paths, bad, statuses[-1])
