"""The node's listener and pipeline in the test process: a study sent over DICOM and
analysed stage by stage, without a broker or worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE

from harness.peers import get_port
from node.config import Settings
from node.db import Database, Job, open_database
from node.listener import start_listener
from node.scheduler import Dispatcher, start_complete_studies
from node.spool import Spool
from workers import pipeline


@dataclass
class InProcessNode:
    """A listening node whose pipeline stages the test runs itself."""

    settings: Settings
    db: Database
    ctx: pipeline.WorkerContext

    def send(self, paths: list[Path]) -> None:
        """C-STORE ``paths`` in one association, each in its own transfer syntax."""
        ae = AE(ae_title="MODALITY")
        for ds in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                   for d in (dcmread(p, stop_before_pixels=True) for p in paths)}:
            ae.add_requested_context(ds[0], [ds[1]])
        assoc = ae.associate("127.0.0.1", self.settings.dicom_port,
                             ae_title=self.settings.ae_title)
        assert assoc.is_established
        for path in paths:
            assert int(assoc.send_c_store(path).Status) == 0
        assoc.release()

    def start_job(self) -> int:
        """The job the scheduler creates for the one study that is complete now."""
        jobs: list[int] = []
        start_complete_studies(self.db, Dispatcher(job=lambda j, _s: jobs.append(j),
                                                   export=lambda _e: None), stable_seconds=0)
        (job_id,) = jobs
        return job_id

    def analyse(self) -> Path:
        """Run the one complete study through QC, inference and report: its SR's path."""
        job_id = self.start_job()
        pipeline.run_qc(self.ctx, job_id)
        pipeline.run_inference(self.ctx, job_id)
        assert pipeline.run_report(self.ctx, job_id) is not None
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.sr_path is not None
            return Path(job.sr_path)


def in_process_node(data: Path, **settings: Any) -> Iterator[InProcessNode]:
    """A node on a free port with its data in ``data`` (for a fixture to ``yield from``)."""
    configured = Settings(data_dir=data, dicom_host="127.0.0.1", dicom_port=get_port(),
                          study_stable_seconds=0, **settings)
    db = open_database(configured.effective_database_url, configured.data_dir)
    server = start_listener(configured, db, block=False)
    assert server is not None
    ctx = pipeline.WorkerContext(settings=configured, db=db,
                                 spool=Spool(configured.spool_dir, configured.incoming_dir))
    yield InProcessNode(configured, db, ctx)
    server.shutdown()
    db.dispose()
