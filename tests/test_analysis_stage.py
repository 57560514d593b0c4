"""QC and inference as one stage (``sononode.analyse``): each image is decoded once.

A simulated study goes to the real listener over DICOM; the stage then runs in-process with
the decoder counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
