"""QC and inference as one stage (``sononode.analyse``): each image is decoded once.

A simulated study goes to the real listener over DICOM; the stage then runs in-process with
the decoder counted.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from inprocess import InProcessNode, in_process_node

from node.db import Job, JobState
from simulator import simulate_study
from workers import pipeline

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    yield from in_process_node(tmp_path_factory.mktemp("node"))


def _new_job(node: InProcessNode, folder: Path, seed: int) -> int:
    simulate_study(folder, seed=seed, vendor="Aurora Imaging", n_images=2, n_loops=1,
                   frames_per_loop=4)
    node.send(sorted(folder.glob("**/*.dcm")))
    return node.start_job()


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from workers.imaging.pixels import load_instance

    decoded: list[str] = []
    original = load_instance

    def counting(path: Path, **kwargs: Any) -> Any:
        decoded.append(Path(path).name)
        return original(path, **kwargs)

    monkeypatch.setattr(pipeline, "load_instance", counting)
    return decoded


def test_each_image_is_decoded_once(node: InProcessNode, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = _new_job(node, tmp_path, seed=41)
    decoded = _count_decodes(monkeypatch)
    qc_done, inferred = pipeline.run_analysis(node.ctx, job_id)
    assert qc_done is not None and inferred is not None
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 3
    analysed = [im for im in inferred.result.images if im.view is not None]
    assert len(analysed) == 3  # QC's frames reached the model
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.INFERRED
        assert job.stage_seconds and {"qc_done", "inferred"} <= set(job.stage_seconds)


def test_beyond_the_memory_bound_inference_decodes_again(node: InProcessNode, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    job_id = _new_job(node, tmp_path, seed=42)
    monkeypatch.setattr(pipeline, "KEEP_DECODED_BYTES", 0)
    decoded = _count_decodes(monkeypatch)
    qc_done, inferred = pipeline.run_analysis(node.ctx, job_id)
    assert qc_done is not None and inferred is not None
    assert len(decoded) == 6  # QC's three, then inference's three
    assert len([im for im in inferred.result.images if im.view is not None]) == 3


def _truncate_pixels(path: Path) -> None:
    """Cut a spooled file short inside its pixel data (decoding it then fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])


def test_qc_threads_give_the_sequential_outcome_in_order(node: InProcessNode,
                                                          tmp_path: Path) -> None:
    with node.db.session() as session:
        job = session.get(Job, _new_job(node, tmp_path, seed=43))
        assert job is not None
        uid = job.study_instance_uid
    sources = node.ctx.sources(uid)
    assert len(sources) == 3
    _truncate_pixels(sources[1].path)  # one broken instance among the sound ones

    sequential = pipeline.assess(sources, max_frames=16, threads=1)
    threaded = pipeline.assess(sources, max_frames=16, threads=3)
    assert threaded.to_json() == sequential.to_json()
    assert list(threaded.instances) == [s.header.sop_instance_uid for s in sources]
    outcomes = [threaded.instances[s.header.sop_instance_uid].outcome for s in sources]
    assert outcomes[1].value == "fail" and all(o.value != "fail" for o in outcomes[2:])


def test_qc_threads_bound_the_instances_in_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.imaging.types import InstanceQC

    started: list[int] = []
    lock = threading.Lock()

    def assess_one(source: Any, max_frames: int) -> tuple[None, InstanceQC]:
        with lock:
            started.append(source)
        time.sleep(0.002)
        return None, pipeline.unassessable("test", f"source {source}")

    monkeypatch.setattr(pipeline, "_assess_one", assess_one)
    threads, handed_out = 3, 0
    sources: Any = list(range(40))  # stand-ins: assess_one above only passes them through
    for source, decoded, qc in pipeline._assessed(sources, 16, threads):
        assert cast(int, source) == handed_out and decoded is None
        assert qc.checks[0].message == f"source {source}"
        handed_out += 1
        time.sleep(0.005)  # a slow consumer: the pool must not run ahead of it
        with lock:
            assert len(started) - handed_out <= threads
    assert handed_out == 40 and sorted(started) == list(range(40))


def test_the_warm_up_study_passes_qc_and_reaches_the_models(node: InProcessNode) -> None:
    from sqlalchemy import func, select

    from node.db import Instance
    from workers.imaging.pixels import decode_dataset
    from workers.imaging.qc import assess_instance
    from workers.imaging.types import PreparedInstance
    from workers.warmup import freeze_long_lived, sector_frames, synthetic_instance, warm_up

    prepared = []
    for n in (1, 4):
        decoded = decode_dataset(synthetic_instance(sector_frames(n, seed=n), "1.2.3.4"))
        qc = assess_instance(decoded)
        # QC finds the sector and keeps every frame, so the models run on the warm-up.
        assert not qc.failed and qc.usable_frames == tuple(range(n))
        prepared.append(PreparedInstance(decoded, qc))
    result = node.ctx.analyser().analyse_study("1.2.3.4", prepared)
    assert [im.view is not None for im in result.images] == [True, True]
    with node.db.session() as session:
        before = (session.scalar(select(func.count()).select_from(Instance)),
                  session.scalar(select(func.count()).select_from(Job)))
    assert warm_up(node.ctx.analyser()) > 0
    assert warm_up(None) > 0  # a worker of the CPU queue only: QC and the SR classes
    with node.db.session() as session:  # nothing of it is indexed
        assert (session.scalar(select(func.count()).select_from(Instance)),
                session.scalar(select(func.count()).select_from(Job))) == before
    try:
        assert freeze_long_lived() > 10_000
    finally:
        gc.unfreeze()
