"""Correcting the AI: a reader's verdict names a result as the SR shows it, is stored with
who and when, shows in the study, the metrics and the audit trail, and the agreed and
corrected cases come out as a folder that ``sononode model train --data`` reads."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN, ADMIN_TOKEN, READER, READER_TOKEN
from fastapi.testclient import TestClient
from inprocess import InProcessNode, in_process_node
from pydantic import SecretStr
from pydicom import dcmread

from dicom_sr import read_sr
from modelkit.data import read_labelled_folder
from node.api import create_app
from node.feedback import export_cases
from simulator import simulate_study
from workers.models.manifest import describe_packs
from workers.models.nets import VIEW_LABELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    yield from in_process_node(
        tmp_path_factory.mktemp("node"),
        api_tokens=SecretStr(f"admin:{ADMIN_TOKEN},reader:{READER_TOKEN}"))


@pytest.fixture(scope="module")
def reported(node: InProcessNode, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    simulate_study(folder, seed=11, vendor="Aurora Imaging", n_images=3, n_loops=0)
    node.send(sorted(folder.glob("*.dcm")))
    return node.analyse()


def _client(node: InProcessNode, headers: dict[str, str]) -> TestClient:
    app = create_app(node.settings, node.db, models_catalogue=lambda: describe_packs(
        node.settings.effective_model_packs))
    return TestClient(app, headers=headers)


def test_feedback_names_what_the_sr_shows_and_closes_the_loop(
    node: InProcessNode, reported: Path, tmp_path: Path
) -> None:
    sr = dcmread(reported)
    summary = read_sr(sr)
    admin = _client(node, ADMIN)
    study = admin.get(f"/studies/{summary.study_instance_uid}").json()
    assert study["sr_sop_instance_uid"] == sr.SOPInstanceUID
    images = sorted(summary.images.values(), key=lambda i: i.sop_instance_uid)
    analysed = [i for i in images if i.view is not None]
    assert len(analysed) >= 2
    # The Tracking UID a viewer reads from the SR is the one the API lists.
    for image in analysed:
        assert study["tracking_uids"][image.sop_instance_uid] == image.tracking_uid
    first, second = analysed[:2]
    assert first.view is not None and second.view is not None
    predicted = {r["sop_instance_uid"]: r["view"]["label"]
                 for r in study["result"]["images"] if r.get("view")}
    right = next(v for v in VIEW_LABELS if v != predicted[second.sop_instance_uid])

    def verdict(image_tracking_uid: str | None, **body: object) -> dict[str, object]:
        return {"sr_sop_instance_uid": sr.SOPInstanceUID,
                "tracking_uid": image_tracking_uid, "item": "view", **body}

    agreed = admin.post("/feedback", json=verdict(first.tracking_uid, verdict="agree"))
    assert agreed.status_code == 201, agreed.text
    assert agreed.json()["predicted_label"] == predicted[first.sop_instance_uid]
    assert agreed.json()["model"] == "sononode-us-sim 1.4.0"
    assert agreed.json()["vendor"] == "aurora imaging"
    corrected = admin.post("/feedback", json=verdict(second.tracking_uid, verdict="corrected",
                                                     corrected_label=right))
    assert corrected.status_code == 201, corrected.text

    # Refusals, each with its reason.
    reader = _client(node, READER)
    assert reader.post("/feedback", json=verdict(first.tracking_uid,
                                                 verdict="agree")).status_code == 403
    no_label = admin.post("/feedback", json=verdict(first.tracking_uid, verdict="corrected"))
    assert no_label.status_code == 422 and "corrected_label" in no_label.text
    unknown = admin.post("/feedback", json=verdict(first.tracking_uid, verdict="corrected",
                                                   corrected_label="spleen"))
    assert unknown.status_code == 422 and "not a view label" in unknown.json()["detail"]
    label_on_agree = admin.post("/feedback", json=verdict(first.tracking_uid, verdict="agree",
                                                          corrected_label=right))
    assert label_on_agree.status_code == 422
    stranger = admin.post("/feedback", json=verdict("1.2.3.4", verdict="agree"))
    assert stranger.status_code == 404 and "Tracking UID" in stranger.json()["detail"]
    no_sr = admin.post("/feedback", json={**verdict(first.tracking_uid, verdict="agree"),
                                          "sr_sop_instance_uid": "1.2.3"})
    assert no_sr.status_code == 404

    # Shown with the study, counted by the metrics, in the audit trail.
    shown = reader.get(f"/studies/{summary.study_instance_uid}").json()["feedback"]
    assert [(f["verdict"], f["corrected_label"]) for f in shown] == [
        ("agree", None), ("corrected", right)]
    metrics = admin.get("/metrics").text
    assert ('sononode_feedback_total{model="sononode-us-sim 1.4.0",task="view",'
            'vendor="aurora imaging",verdict="agree"} 1.0') in metrics
    events = admin.get("/audit", params={"study": summary.study_instance_uid}).json()["events"]
    assert sum(1 for e in events if e["action"] == "feedback") == 2

    # The confirmed cases, as the training toolkit reads them.
    with node.db.session() as session:
        done = export_cases(session, node.ctx.spool, tmp_path / "cases")
    assert (done.images, done.labels, done.missing) == (2, 2, ())
    cli = subprocess.run(
        [sys.executable, "-m", "node.cli", "feedback", "export", "--out",
         str(tmp_path / "by-cli")], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SONONODE_DATA_DIR": str(node.settings.data_dir)})
    assert cli.returncode == 0, cli.stderr
    assert "2 image(s) with 2 confirmed label(s)" in cli.stdout
    assert ((tmp_path / "by-cli" / "labels.csv").read_text()
            == (tmp_path / "cases" / "labels.csv").read_text())
    with (tmp_path / "cases" / "labels.csv").open(newline="") as handle:
        rows = {r["sop_instance_uid"]: r for r in csv.DictReader(handle)}
    assert rows[first.sop_instance_uid]["view"] == predicted[first.sop_instance_uid]
    assert rows[second.sop_instance_uid]["view"] == right
    frames = read_labelled_folder(tmp_path / "cases", tmp_path / "cases" / "labels.csv",
                                  input_size=(64, 64))
    assert sorted(VIEW_LABELS[i] for i in set(frames.labels["view"].tolist())) == sorted(
        {predicted[first.sop_instance_uid], right})
