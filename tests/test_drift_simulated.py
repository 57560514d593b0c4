"""Drift monitoring on the simulator's studies, through the node's own QC and analysis.

The bundled pack's drift reference was fitted on simulated studies with other seeds
(:data:`modelkit.drift.REFERENCE_SEED`); these use :data:`modelkit.drift.TEST_SEED`. A new
site's studies of the vendors seen in training, from the first one on, must not alarm;
one vendor whose scanner switches to an unseen image style must, while the others stay
green; ``/drift`` and the Prometheus gauges must agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN
from fastapi.testclient import TestClient

from modelkit.drift import TEST_SEED, SiteCondition, site_study_signals
from node.api import create_app
from node.config import Settings
from node.db import Database
from node.drift import observe
from simulator.vendors import HELD_OUT_VENDOR, TRAINING_VENDORS
from workers.models.inference import Analyser
from workers.models.packs import ModelPack

pytestmark = pytest.mark.slow
PACK = Path(__file__).resolve().parents[1] / "deploy" / "models" / "sononode-us-sim"
#: Studies per training vendor, interleaved as a site's worklist would be (4 x 75 = 300).
PER_VENDOR = 75
IMAGES = 2


@pytest.fixture(scope="module")
def analyser() -> Iterator[Analyser]:
    pack = ModelPack.load(PACK, device="cpu")
    assert pack.drift is not None, "the bundled pack carries its drift reference"
    yield Analyser([pack])


def _send(db: Database, analyser: Analyser, condition: SiteCondition, seed: int) -> str:
    """One simulated study through QC, analysis and the drift monitor; its status."""
    analysis, signals, _ = site_study_signals(analyser, condition, seed)
    pack, study = signals[0]
    with db.session() as session:
        status = observe(session, study, pack.drift,
                         study_instance_uid=analysis.result.study_instance_uid)
    return status.status


def test_a_new_site_stays_green_then_one_vendor_alarms(db: Database, analyser: Analyser,
                                                       settings: Settings) -> None:
    statuses: dict[str, list[str]] = {v: [] for v in TRAINING_VENDORS}
    for i in range(PER_VENDOR):
        for v, vendor in enumerate(TRAINING_VENDORS):
            condition = SiteCondition(vendor=vendor, n_images=IMAGES)
            statuses[vendor].append(_send(db, analyser, condition, TEST_SEED + v * 1000 + i))
    for vendor, seen in statuses.items():
        assert "alert" not in seen, f"{vendor}: false alarm at study {seen.index('alert') + 1}"
        assert set(seen) == {"ok"}

    # The first vendor's scanner now forms its images like the held-out vendor's.
    shifted, others = TRAINING_VENDORS[0], TRAINING_VENDORS[1:]
    after: list[str] = []
    for i in range(30):
        after.append(_send(db, analyser, SiteCondition(vendor=shifted, n_images=IMAGES,
                                                       image_style=HELD_OUT_VENDOR),
                           TEST_SEED + 50_000 + i))
        if i % 3 == 0:
            for v, vendor in enumerate(others):
                statuses[vendor].append(_send(db, analyser,
                                              SiteCondition(vendor=vendor, n_images=IMAGES),
                                              TEST_SEED + 60_000 + v * 1000 + i))
    assert "alert" in after, "the switched scanner did not alarm within 30 studies"
    assert after[-1] == "alert"
    for vendor in others:
        assert "alert" not in statuses[vendor], vendor

    client = TestClient(create_app(settings, db), headers=ADMIN)
    streams = client.get("/drift").json()["streams"]
    metrics = client.get("/metrics").text
    assert len(streams) == len(TRAINING_VENDORS)
    for stream in streams:
        labels = (f'model="{stream["model"]}",scanner="{stream["scanner"]}",'
                  f'vendor="{stream["vendor"]}"')
        value = 1.0 if stream["status"] == "alert" else 0.0
        assert f"sononode_drift_alert{{{labels}}} {value}" in metrics
        assert stream["status"] == ("alert" if stream["vendor"] == shifted.lower() else "ok")
        assert "this vendor and scanner" in stream["reference"]
