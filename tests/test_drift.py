"""Drift monitoring: reference fitting, the sequential test, streams in the index, the API.

Synthetic studies (random signals with a known distribution) test the statistics: a
stream drawn from the reference's own distribution, with seeds never used to fit it,
must stay quiet, and one whose distribution moves must alarm. The simulator's studies
through the node's own stages are in ``tests/test_drift_simulated.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from conftest import ADMIN, READER
from fastapi.testclient import TestClient

from node.api import create_app
from node.config import Settings
from node.db import Database, DriftObservation
from node.drift import drift_report, observe
from node.drift.monitor import Status, step
from node.drift.reference import (
    POOLED,
    Reference,
    SignalReference,
    fit_group,
    fit_projection,
    group_key,
)
from node.drift.signals import (
    ALLOWANCE,
    SLOW_ALLOWANCE,
    ImageSignals,
    StudySignals,
    catalogue,
)
from node.drift.vendors import normalise, scanner_of
from workers.pipeline import flag_drift

HEADS = ("view",)
SPECS = catalogue(HEADS)
VIEWS = ("liver", "kidney", "thyroid")


def _study(rng: np.random.Generator, *, n: int = 5, brightness: float = 0.0,
           views: Sequence[float] = (0.5, 0.3, 0.2), fail_rate: float = 0.05) -> list[ImageSignals]:
    """One synthetic study: a per-study effect plus per-image noise (images of a study are
    correlated, as real ones are)."""
    study_effect = rng.normal(0, 4)
    images = []
    for _ in range(n):
        failed = rng.random() < fail_rate
        values: dict[str, float | str | None] = {
            "intensity_mean": 100 + brightness + study_effect + rng.normal(0, 8),
            "intensity_contrast": 40 + rng.normal(0, 3),
            "region_fraction": float(np.clip(rng.normal(0.5, 0.05), 0.1, 0.9)),
            "pixel_spacing": 0.1,
            "frames": 1.0,
            "photometric": "MONOCHROME2",
            "qc_fail_rate": 1.0 if failed else 0.0,
        }
        if not failed:
            label = str(rng.choice(VIEWS, p=np.asarray(views)))
            values.update({
                "view_mix": label,
                "view_confidence": float(np.clip(rng.beta(20, 2), 0, 1)),
                "ood_score": float(rng.gamma(4, 1)),
                "ood_rate": 1.0 if rng.random() < 0.03 else 0.0,
                "review_rate": 1.0 if rng.random() < 0.1 else 0.0,
            })
        embedding = tuple(float(v) for v in rng.normal(0, 1, 4) + study_effect / 8)
        images.append(ImageSignals(values, None if failed else embedding))
    return images


@pytest.fixture(scope="module")
def reference() -> Reference:
    rng = np.random.default_rng(11)
    studies = [_study(rng) for _ in range(240)]
    group = fit_group(studies, SPECS, vendor="acme", scanner="x1", seed=1)
    return Reference(description="synthetic", groups={group_key("acme", "x1"): group,
                                                      POOLED: group})


def _statuses(reference: Reference, studies: Sequence[list[ImageSignals]]) -> list[bool]:
    match = reference.group_for("acme", "x1")
    assert match is not None and not match.fallback
    state: dict[str, object] = {}
    out = []
    for images in studies:
        result = step(match.group, state, images)
        state = result.state
        out.append(bool(result.reasons))
    return out


def _finding_study(rng: np.random.Generator, *, malignant: float = 0.25) -> list[ImageSignals]:
    """A study whose thyroid images (1 to 4) carry a nodule finding head with labels none,
    benign and malignant; the classifier's probability of malignant overlaps between the
    classes as a real one's does (AUC about 0.8)."""
    images = []
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.choice(3, p=[(1 - malignant) * 0.53, (1 - malignant) * 0.47, malignant])
        p_malignant = float(rng.beta(*((1.2, 6.0), (2.0, 4.0), (3.5, 2.5))[kind]))
        label = "malignant" if p_malignant > 0.5 else ("benign", "none")[int(rng.random() < 0.5)]
        values: dict[str, float | str | None] = {
            "intensity_mean": 100 + rng.normal(0, 8),
            "nodule_mix": label,
            "nodule_confidence": max(p_malignant, 1 - p_malignant),
            "nodule_severe": p_malignant,
        }
        images.append(ImageSignals(values))
    return images


def test_a_doubled_prevalence_alarms_on_the_slow_chart_of_the_severe_share() -> None:
    """Twice the malignant nodules: the expected share of the most severe finding, on its
    slow chart, alarms, and says so."""
    specs = catalogue(("nodule",))
    assert specs["nodule_severe"].allowance == SLOW_ALLOWANCE < ALLOWANCE
    rng = np.random.default_rng(5)
    group = fit_group([_finding_study(rng) for _ in range(300)], specs, vendor="acme",
                      scanner="x1", seed=3)
    severe = group.signals["nodule_severe"]
    assert severe.allowance == SLOW_ALLOWANCE
    again = SignalReference.from_json("nodule_severe", json.loads(json.dumps(severe.to_json())))
    assert again.allowance == SLOW_ALLOWANCE and again.to_json() == severe.to_json()
    delays = []
    for replicate in range(5):
        stream = np.random.default_rng(100 + replicate)
        state: dict[str, object] = {}
        for _ in range(60):  # the usual prevalence: quiet
            result = step(group, state, _finding_study(stream))
            state = result.state
            assert not result.reasons
        for i in range(300):
            result = step(group, state, _finding_study(stream, malignant=0.5))
            state = result.state
            if result.scores.get("nodule_severe", 0.0) >= 1.0:
                assert "expected share of the most severe nodule finding higher than the " \
                    "reference" in result.reasons
                delays.append(i + 1)
                break
    assert len(delays) == 5 and float(np.median(delays)) <= 100, delays


def test_vendor_names_are_normalised_and_aliased() -> None:
    assert normalise("  GE  Healthcare, Inc. ") == "ge healthcare inc"
    assert normalise("") == normalise(None) == "unknown"
    aliases = {"GE Medical Systems": "GE Healthcare"}
    a = scanner_of("GE MEDICAL SYSTEMS", "LOGIQ E10", aliases)
    b = scanner_of("ge healthcare", "Logiq-E10", aliases)
    assert (a.vendor, a.scanner) == (b.vendor, b.scanner) == ("ge healthcare", "logiq e10")
    assert a.as_sent == "GE MEDICAL SYSTEMS / LOGIQ E10"


def test_reference_round_trips_through_json(reference: Reference) -> None:
    again = Reference.from_json(json.loads(json.dumps(reference.to_json())))
    assert again.to_json() == reference.to_json()
    group = again.groups[group_key("acme", "x1")]
    assert set(group.signals) >= {"intensity_mean", "view_mix", "qc_fail_rate", "embedding"}
    # Constant signals are monitored too: any change of them is a change of the input.
    assert "pixel_spacing" in group.signals
    assert 0.0 < group.signals["intensity_mean"].rho < 0.9
    with pytest.raises(ValueError, match="version"):
        Reference.from_json({**reference.to_json(), "version": 99})


def test_false_alarm_rate_is_what_the_docs_say(reference: Reference) -> None:
    """Fresh studies of the reference's own distribution (seeds never used to fit it), in
    streams of 1,000 from their first study: at most the target of 0.5 false-alarm
    episodes per 1,000 studies, with a margin for chance (expected here: 4 in 8,000)."""
    rng = np.random.default_rng(2024)
    pool = [_study(rng) for _ in range(2000)]
    episodes = 0
    for _ in range(8):
        statuses = _statuses(reference, [pool[int(i)] for i in rng.integers(2000, size=1000)])
        episodes += sum(1 for i, s in enumerate(statuses) if s and (i == 0 or not statuses[i - 1]))
    assert episodes <= 8, f"{episodes} false-alarm episodes in 8,000 studies"


@pytest.mark.parametrize(("shift", "within"), [
    ({"brightness": 10.0}, 30),
    ({"views": (0.2, 0.3, 0.5)}, 40),
    ({"fail_rate": 0.3}, 15),
])
def test_a_shift_alarms_within_a_few_studies(reference: Reference, shift: dict[str, object],
                                             within: int) -> None:
    rng = np.random.default_rng(7)
    studies = [_study(rng) for _ in range(50)] + [_study(rng, **shift) for _ in range(within)]  # type: ignore[arg-type]
    statuses = _statuses(reference, studies)
    assert not any(statuses[:50])
    assert any(statuses[50:])


def test_one_odd_image_cannot_raise_an_alarm(reference: Reference) -> None:
    rng = np.random.default_rng(3)
    studies = [_study(rng) for _ in range(30)]
    odd = ImageSignals({**studies[-1][0].values, "photometric": "RGB", "intensity_mean": 255.0})
    studies[-1] = [odd, *studies[-1][1:]]
    assert not any(_statuses(reference, studies))


def test_signal_scores_are_capped_per_image() -> None:
    signal = SignalReference(name="intensity_mean", kind=SPECS["intensity_mean"].kind, rho=0.0,
                             t_mean=0.0, t_sd=1.0, h_up=5.0, h_down=5.0,
                             quantiles=tuple(np.linspace(0, 100, 201)))
    scores = signal.scores([ImageSignals({"intensity_mean": v}) for v in (-1e9, 50.0, 1e9)])
    assert scores[1] == pytest.approx(0.0, abs=0.01)
    assert -3.0 <= scores[0] < -2.5 and 2.5 < scores[2] <= 3.0


def test_projection_keeps_the_largest_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (500, 6)) * np.array([10, 5, 1, 1, 1, 1])
    projection = fit_projection(x, axes=2)
    coords = np.asarray([projection.project(row) for row in x])
    assert coords.shape == (500, 2)
    assert coords[:, 0].std() == pytest.approx(10, rel=0.15)
    assert projection.project(np.zeros(3)) is None


# ----------------------------------------------------------------------------------------
# Streams in the index
# ----------------------------------------------------------------------------------------
def _signals(images: list[ImageSignals], *, manufacturer: str = "ACME",
             scanner: str = "X1") -> StudySignals:
    return StudySignals(manufacturer=manufacturer, model_name=scanner, model="demo 1.0",
                        heads=HEADS, images=tuple(images))


def test_streams_alarm_per_vendor_and_a_study_counts_once(db: Database,
                                                          reference: Reference) -> None:
    rng = np.random.default_rng(5)
    with db.session() as session:
        for i in range(40):
            observe(session, _signals(_study(rng)), reference, study_instance_uid=f"2.25.{i}")
            status = observe(session, _signals(_study(rng, brightness=25.0), manufacturer="Other"),
                             reference, study_instance_uid=f"2.25.{i}")
    assert status.alert and status.vendor == "other"
    assert any("intensity mean higher" in r for r in status.reasons)
    assert "drift alert for Other / X1 with demo 1.0" in status.review_reason()
    with db.session() as session:
        again = observe(session, _signals(_study(rng, brightness=90.0)), reference,
                        study_instance_uid="2.25.3")
        report = drift_report(session)
    assert again.status == Status.OK
    streams = {s["vendor"]: s for s in report["streams"]}
    assert streams["acme"]["studies"] == 40 and streams["acme"]["status"] == "ok"
    assert streams["other"]["status"] == "alert"
    # "Other" is not in the reference: compared with the pooled group, and said so.
    assert "not in the reference" in streams["other"]["reference"]
    accuracy = streams["acme"]["expected_accuracy"]["view"]
    assert accuracy["reference"] == pytest.approx(0.91, abs=0.03)


def test_a_pack_without_reference_warms_up_then_freezes_a_site_baseline(db: Database) -> None:
    rng = np.random.default_rng(8)
    statuses = []
    with db.session() as session:
        for i in range(45):
            statuses.append(observe(session, _signals(_study(rng)), None,
                                    study_instance_uid=f"2.25.{i}", baseline_studies=40))
    assert {s.status for s in statuses[:39]} == {Status.WARMING}
    assert "site baseline is frozen after 40 studies" in statuses[0].reasons[0]
    assert {s.status for s in statuses[40:]} == {Status.OK}
    with db.session() as session:
        stream = drift_report(session)["streams"][0]
        assert stream["reference"].startswith("site baseline: 40 studies")
        assert session.query(DriftObservation).count() == 45


def test_drift_flag_makes_the_result_need_review(db: Database, reference: Reference) -> None:
    from dicom_sr.model import StudyResult

    rng = np.random.default_rng(9)
    with db.session() as session:
        for i in range(30):
            status = observe(session, _signals(_study(rng, fail_rate=0.6)), reference,
                             study_instance_uid=f"2.25.{i}")
    assert status.alert
    result = StudyResult(study_instance_uid="1.2.3", images=(), algorithms=(), conclusion=None,
                         assessable=True, needs_review=False, review_reasons=())
    flagged = flag_drift(result, [status])
    assert flagged.needs_review
    assert flagged.review_reasons[-1].startswith("drift alert for ACME / X1 with demo 1.0: ")
    assert "qc fail rate higher than the reference" in flagged.review_reasons[-1]
    assert flag_drift(result, []) is result


# ----------------------------------------------------------------------------------------
# API and metrics
# ----------------------------------------------------------------------------------------
@pytest.fixture
def client(settings: Settings, db: Database) -> TestClient:
    return TestClient(create_app(settings, db), headers=ADMIN)


def _metric(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name):]] = float(value)
    return out


def test_api_and_gauges_agree(client: TestClient, db: Database, reference: Reference) -> None:
    rng = np.random.default_rng(4)
    with db.session() as session:
        for i in range(30):
            observe(session, _signals(_study(rng)), reference, study_instance_uid=f"2.25.{i}")
            observe(session, _signals(_study(rng, brightness=30.0), manufacturer="Beta Corp."),
                    reference, study_instance_uid=f"2.25.{i}")
    body = client.get("/drift").json()
    assert body["false_alarm_target_per_1000_studies"] == 0.5
    streams = {s["vendor"]: s for s in body["streams"]}
    assert body["streams"][0]["vendor"] == "beta corp"  # alerting first
    text = client.get("/metrics").text
    alerts = _metric(text, "sononode_drift_alert")
    assert alerts['{model="demo 1.0",scanner="x1",vendor="beta corp"}'] == 1.0
    assert alerts['{model="demo 1.0",scanner="x1",vendor="acme"}'] == 0.0
    scores = _metric(text, "sononode_drift_score")
    for vendor, stream in streams.items():
        for signal in stream["signals"]:
            key = (f'{{model="demo 1.0",scanner="x1",signal="{signal["name"]}",'
                   f'vendor="{vendor}"}}')
            assert scores[key] == pytest.approx(signal["score"], abs=1e-3)
            assert signal["alarming"] == (signal["score"] >= 1.0)
    assert _metric(text, "sononode_drift_studies")[
        '{model="demo 1.0",scanner="x1",vendor="acme"}'] == 30

    one = client.get("/drift/beta corp").json()
    assert one["streams"][0]["status"] == "alert" and len(one["history"]) == 30
    assert one["history"][-1]["scores"]["intensity_mean"] >= 1.0
    missing = client.get("/drift/nobody")
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]


def test_site_baseline_through_the_api(client: TestClient, db: Database,
                                       reference: Reference, settings: Settings,
                                       ) -> None:
    rng = np.random.default_rng(6)
    with db.session() as session:
        for i in range(30):
            observe(session, _signals(_study(rng, brightness=30.0)), reference,
                    study_instance_uid=f"2.25.{i}")
    body = {"scanner": "x1", "model": "demo 1.0", "studies": 30}
    url = "/drift/acme/baseline"
    reader = TestClient(create_app(settings, db), headers=READER)
    assert reader.post(url, json=body).status_code == 403
    assert client.post(url, json={**body, "studies": 5}).status_code == 422
    assert client.post("/drift/x/baseline", json=body).status_code == 404
    frozen = client.post(url, json=body)
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["status"] == "ok"
    assert frozen.json()["reference"].startswith("site baseline: 30 studies")
    with db.session() as session:
        # The brighter studies are now what normal looks like at this site.
        status = observe(session, _signals(_study(rng, brightness=30.0)), reference,
                         study_instance_uid="2.25.100")
    assert status.status == Status.OK
    cleared = client.delete(url, params={k: body[k] for k in ("scanner", "model")})
    assert cleared.status_code == 200 and cleared.json()["baseline_frozen_at"] is None
    audit = client.get("/audit", params={"action": "drift_baseline"}).json()
    assert [e["detail"]["action"] for e in audit["events"]] == ["cleared", "frozen"]
    again = client.post(url, json={**body, "studies": 20})
    assert again.status_code == 200  # 31 studies observed: enough for 20
