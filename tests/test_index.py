"""Index writes under concurrency, and integrity checks of received files."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from fixtures import make_us_dataset, require_tools, write
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.db import Database, Instance, Study, StudyState
from node.handlers import check_complete
from node.index import InstanceMeta, InvalidInstance, RegisterOutcome, register_instance


def test_concurrent_instances_of_a_new_study_are_all_indexed(db: Database) -> None:
    study = generate_uid()
    metas = [InstanceMeta.from_dataset(make_us_dataset(study_uid=study, seed=i),
                                       "1.2.840.10008.1.2.1") for i in range(8)]
    outcomes: list[RegisterOutcome] = []
    barrier = threading.Barrier(len(metas))

    def register(meta: InstanceMeta) -> None:
        barrier.wait()
        outcomes.append(register_instance(db, meta, path=meta.sop_instance_uid,
                                          size_bytes=1, calling_ae_title="T"))

    threads = [threading.Thread(target=register, args=(m,)) for m in metas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(RegisterOutcome.NEW) == len(metas)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(metas)
        row = session.get(Study, study)
        assert row is not None and row.revision == len(metas)


def _metas(count: int, study: str | None = None) -> list[InstanceMeta]:
    study = study or generate_uid()
    return [InstanceMeta.from_dataset(make_us_dataset(study_uid=study, seed=i),
                                      "1.2.840.10008.1.2.1") for i in range(count)]


@pytest.mark.parametrize("max_group", [64, 4])
def test_registrations_arriving_during_a_commit_share_the_next_one(
    db: Database, max_group: int
) -> None:
    """Group commit: while one association's registration commits, the others queue and
    are then written in groups of at most ``max_group``, one commit each, and each learns
    its outcome (also one queued behind more than a group)."""
    from sqlalchemy import event

    import node.index as index

    metas = _metas(12)
    group = index._group_of(db)
    group.max_group = max_group
    commits: list[int] = []

    def on_commit(_conn: object) -> None:
        if not commits:  # hold the first commit until the other 11 are queued
            wait_until = threading.Event()
            for _ in range(500):
                if len(group._queue) == len(metas) - 1:
                    break
                wait_until.wait(0.01)
        commits.append(1)

    event.listen(db.engine, "commit", on_commit)
    outcomes: dict[str, RegisterOutcome] = {}

    def register(meta: InstanceMeta) -> None:
        outcomes[meta.sop_instance_uid] = register_instance(
            db, meta, path=meta.sop_instance_uid, size_bytes=1, calling_ae_title="T")

    first = threading.Thread(target=register, args=(metas[0],))
    first.start()
    while not commits and not group._leading:
        threading.Event().wait(0.001)
    threads = [threading.Thread(target=register, args=(m,)) for m in metas[1:]]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(timeout=60)
    event.remove(db.engine, "commit", on_commit)
    assert set(outcomes.values()) == {RegisterOutcome.NEW} and len(outcomes) == 12
    assert len(commits) == 1 + -(-11 // max_group)
    with db.session() as session:
        row = session.get(Study, metas[0].study_instance_uid)
        assert row is not None and row.revision == 12


def test_one_instance_twice_in_a_group_is_stored_once(db: Database) -> None:
    from node.index import _register_group, _Registration

    meta = _metas(1)[0]
    twice = [_Registration(meta, "a", 1, "T"), _Registration(meta, "b", 1, "T")]
    assert _register_group(db, twice) == [RegisterOutcome.NEW, RegisterOutcome.DUPLICATE]


def test_a_group_that_collides_with_another_writer_is_written_one_by_one(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process indexed one of the group's instances between the check and the
    insert: the group's transaction fails on it, and each is then registered alone."""
    import node.index as index

    metas = _metas(3)
    register_instance(db, metas[1], path="x", size_bytes=1, calling_ae_title="OTHER")
    real = index._indexed
    missed: list[str] = []

    def check_missing_the_other_writer(conn: object, sop: str) -> bool:
        if sop == metas[1].sop_instance_uid and not missed:
            missed.append(sop)
            return False
        return real(conn, sop)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "_indexed", check_missing_the_other_writer)
    entries = [index._Entry(index._Registration(m, m.sop_instance_uid, 1, "T")) for m in metas]
    index.GroupCommit._commit(db, entries)
    assert missed and [e.outcome for e in entries] == [
        RegisterOutcome.NEW, RegisterOutcome.DUPLICATE, RegisterOutcome.NEW]
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SOPInstanceUID", "1." * 40), ("SeriesInstanceUID", ["1.2.3", "1.2.4"]),
     ("StudyInstanceUID", "1.2.3/../4"), ("SOPClassUID", "")],
    ids=["overlong", "multi-valued", "not-a-uid", "empty"],
)
def test_an_identity_that_is_not_one_uid_is_refused(keyword: str, value: object) -> None:
    ds = make_us_dataset()
    setattr(ds, keyword, value)
    with pytest.raises(InvalidInstance, match=keyword):
        InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1")


def test_a_malformed_descriptive_attribute_is_recorded_as_absent() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = make_us_dataset()
    tag = Tag("Manufacturer")
    ds._dict[tag] = RawDataElement(tag, "FD", 6, b"12\\34", 0, False, True)
    meta = InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1")
    assert meta.manufacturer is None and meta.sop_instance_uid == ds.SOPInstanceUID


def test_document_only_study_is_stored_not_receiving(db: Database) -> None:
    ds = make_us_dataset(sop_class="1.2.840.10008.5.1.4.1.1.104.1", modality="DOC")
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"), path="p",
                      size_bytes=1, calling_ae_title="T")
    with db.session() as session:
        row = session.get(Study, str(ds.StudyInstanceUID))
        assert row is not None and row.state == StudyState.STORED


@pytest.mark.dcmtk
@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.999])
def test_truncated_compressed_pixel_data_is_detected(tmp_path: Path, fraction: float) -> None:
    require_tools("dcmcjpeg", "dcmconv")
    source = write(make_us_dataset(rows=256, cols=256), tmp_path / "a.dcm")
    for name, tool in (("jpeg", ["dcmcjpeg", "+eb"]), ("deflated", ["dcmconv", "+td"])):
        encoded = tmp_path / f"{name}.dcm"
        subprocess.run([*tool, str(source), str(encoded)], check=True)
        check_complete(encoded)  # the whole file is fine
        data = encoded.read_bytes()
        cut = tmp_path / f"{name}-cut.dcm"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(Exception):  # noqa: B017  (ValueError, or zlib.error when deflated)
            check_complete(cut)
