"""The pages for people: the landing page, the API docs and the IT dashboard, offline.

Unit tests call ``/dashboard/data`` through FastAPI's test client over a real index (SQLite,
and PostgreSQL where the server is there). The acceptance is the real consumer, headless
Chromium (``tests/browser/page.cjs``, puppeteer-core driving the system's
``/usr/bin/chromium``): against a node started with ``sononode up`` that analysed simulated
studies of two vendors, each page must render with every request going to the node itself
(requests anywhere else are recorded and aborted through the DevTools Protocol), no console
error and no uncaught exception; the screenshots are kept (``/tmp/sononode-*.png``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ADMIN, ADMIN_TOKEN, READER, READER_TOKEN
from fastapi.testclient import TestClient
from fixtures import make_us_dataset, require_npm_packages, skip_or_fail
from pydicom import dcmread
from pynetdicom import AE

from harness.databases import create_postgres, drop_postgres
from harness.peers import Node, start_node, wait_for
from node.api import create_app
from node.api.routes.dashboard import bucket_query
from node.api.schemas import BucketSize
from node.config import Settings
from node.db import (
    Database,
    Export,
    ExportState,
    ImageResultRow,
    Job,
    JobState,
    open_database,
    utcnow,
)
from node.index import InstanceMeta, register_instance

HARNESS = Path(__file__).resolve().parent / "browser"
PACK = {"name": "sononode-us-sim", "version": "1.3.0", "ood": {"threshold": 8.0}}


# ----------------------------------------------------------------------------------------
# /dashboard/data over a real index
# ----------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def index(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Database]:
    """The index on SQLite (the node's embedded default) or on PostgreSQL."""
    if request.param == "sqlite":
        database = open_database(settings.effective_database_url, settings.data_dir)
        yield database
        database.dispose()
        return
    url = create_postgres()
    database = open_database(url)
    yield database
    database.dispose()
    drop_postgres(url)


def _client(settings: Settings, db: Database, headers: dict[str, str] = READER) -> TestClient:
    return TestClient(create_app(settings, db, models_catalogue=lambda: [PACK]), headers=headers)


def _analysed(db: Database, study: str, vendor: str, *, hours_ago: float,
              images: list[dict[str, Any]]) -> int:
    """A study of ``vendor`` analysed ``hours_ago``: one job, one result row per image."""
    ds = make_us_dataset(study_uid=study)
    register_instance(db, InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1"),
                      path=f"{study}.dcm", size_bytes=1, calling_ae_title="US1")
    at = utcnow() - timedelta(hours=hours_ago)
    with db.session() as session:
        job = Job(study_instance_uid=study, revision=1, state=JobState.DONE, created_at=at)
        session.add(job)
        session.flush()
        for n, image in enumerate(images):
            session.add(ImageResultRow(
                job_id=job.id, sop_instance_uid=f"{study}.{n}", manufacturer=vendor,
                model_name="sononode-us-sim", created_at=at,
                **{"qc_outcome": "pass", "view_label": "liver", "finding_label": "normal",
                   "ood_score": 1.0, "needs_review": False, **image}))
        return job.id


def test_dashboard_data_needs_a_reader_token(settings: Settings, db: Database) -> None:
    """401 without a token or with an unknown one; a reader's and an admin's token read."""
    app = create_app(settings, db)
    anonymous = TestClient(app)
    assert anonymous.get("/dashboard/data").status_code == 401
    wrong = anonymous.get("/dashboard/data", headers={"Authorization": "Bearer not-a-token"})
    assert wrong.status_code == 401
    assert "token" in wrong.json()["detail"]
    for headers in (READER, ADMIN):
        assert anonymous.get("/dashboard/data", headers=headers).status_code == 200


@pytest.mark.parametrize("window", ["nonsense", "7", "0d", "-1h", "1000d", ""])
def test_a_window_that_is_not_offered_is_422_with_the_choices(
        settings: Settings, db: Database, window: str) -> None:
    response = _client(settings, db).get("/dashboard/data", params={"window": window})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "window"]
    assert "'24h', '7d', '30d' or '90d'" in error["msg"]


@pytest.mark.parametrize(("window", "bucket", "count"), [
    ("24h", "hour", 24), ("7d", "hour", 168), ("30d", "day", 30), ("90d", "day", 90)])
def test_the_window_chooses_the_buckets(settings: Settings, db: Database, window: str,
                                        bucket: str, count: int) -> None:
    body = _client(settings, db).get("/dashboard/data", params={"window": window}).json()
    assert (body["window"], body["bucket"], len(body["bucket_starts"])) == (window, bucket, count)
    assert body["since"] == body["bucket_starts"][0]
    assert body["bucket_starts"] == sorted(body["bucket_starts"])


def test_an_empty_index(settings: Settings, db: Database) -> None:
    body = _client(settings, db).get("/dashboard/data").json()
    assert body["window"] == "7d"
    assert body["streams"] == [] and body["vendors_without_images"] == []
    assert body["exports"] == {"by_state": {"pending": 0, "retrying": 0, "sent": 0, "dead": 0},
                               "oldest_pending_at": None, "oldest_pending_age_seconds": None,
                               "dead_letters": []}
    assert body["workers"] == []
    # The same readiness as /ready: no worker, so not ready, with the reason.
    assert body["readiness"]["ready"] is False
    assert body["readiness"]["checks"]["analysis"].startswith("error: no live worker")
    assert body["node"] == settings.ae_title


def test_counts_rates_and_mix_per_vendor_and_bucket(settings: Settings, index: Database) -> None:
    db = index
    _analysed(db, "1.2.840.99.101", "Northwind Medical", hours_ago=1, images=[
        {"qc_outcome": "fail", "view_label": None, "finding_label": None, "ood_score": None},
        {"needs_review": True, "ood_score": 9.5, "finding_label": "benign_nodule"},
        {"view_label": "thyroid_transverse"},
    ])
    _analysed(db, "1.2.840.99.102", "Northwind Medical", hours_ago=50, images=[{}, {}])
    _analysed(db, "1.2.840.99.103", "Aurora Imaging", hours_ago=5 * 24, images=[
        {"needs_review": True}])
    old = _analysed(db, "1.2.840.99.104", "Kestrel Sonics", hours_ago=20 * 24, images=[{}])
    with db.session() as session:
        session.add_all([
            Export(job_id=old, study_instance_uid="1.2.840.99.104", destination="PACS@h:104",
                   state=ExportState.PENDING, created_at=utcnow() - timedelta(minutes=30)),
            Export(job_id=old, study_instance_uid="1.2.840.99.104", destination="PACS@h:104",
                   state=ExportState.DEAD, attempts=9, last_error="association rejected"),
            Export(job_id=old, study_instance_uid="1.2.840.99.104", destination="PACS@h:104",
                   state=ExportState.SENT),
        ])
    client = _client(settings, db)

    week = client.get("/dashboard/data", params={"window": "7d"}).json()
    streams = {s["vendor"]: s for s in week["streams"]}
    assert set(streams) == {"Northwind Medical", "Aurora Imaging"}
    assert week["vendors_without_images"] == ["Kestrel Sonics"]
    north = streams["Northwind Medical"]
    assert (north["model"], north["images"], north["studies"]) == ("sononode-us-sim", 5, 2)
    assert (north["qc_fail"], north["needs_review"], north["ood"]) == (1, 1, 1)
    assert north["ood_threshold"] == 8.0
    assert north["views"] == {"liver": 3, "thyroid_transverse": 1}
    assert north["findings"] == {"benign_nodule": 1, "normal": 3}
    # Hourly buckets: the two studies in two buckets, each at the start of its hour.
    assert [b["images"] for b in north["buckets"]] == [2, 3]
    assert all(b["start"] in week["bucket_starts"] for b in north["buckets"])
    assert north["buckets"][1] == {"start": north["buckets"][1]["start"], "images": 3,
                                   "studies": 1, "qc_fail": 1, "needs_review": 1, "ood": 1}
    assert streams["Aurora Imaging"]["needs_review"] == 1

    month = client.get("/dashboard/data", params={"window": "30d"}).json()
    assert {s["vendor"] for s in month["streams"]} == {
        "Northwind Medical", "Aurora Imaging", "Kestrel Sonics"}
    assert all(b["start"].endswith("T00:00:00Z") for s in month["streams"]
               for b in s["buckets"])
    assert sum(s["images"] for s in month["streams"]) == 7

    day = client.get("/dashboard/data", params={"window": "24h"}).json()
    assert [s["vendor"] for s in day["streams"]] == ["Northwind Medical"]
    assert day["streams"][0]["images"] == 3

    exports = week["exports"]
    assert exports["by_state"] == {"pending": 1, "retrying": 0, "sent": 1, "dead": 1}
    assert 29 * 60 < exports["oldest_pending_age_seconds"] < 40 * 60
    (dead,) = exports["dead_letters"]
    assert (dead["state"], dead["attempts"], dead["last_error"]) == (
        "dead", 9, "association rejected")


def test_ood_is_unknown_without_a_threshold(settings: Settings, db: Database) -> None:
    """A pack that states no OOD threshold: the OOD count is null, not zero."""
    _analysed(db, "1.2.840.99.111", "Northwind Medical", hours_ago=1, images=[{}])
    client = TestClient(create_app(settings, db, models_catalogue=lambda: [
        {"name": "sononode-us-sim", "version": "1.3.0"}]), headers=READER)
    (stream,) = client.get("/dashboard/data").json()["streams"]
    assert stream["ood"] is None and stream["ood_threshold"] is None
    assert stream["buckets"][0]["ood"] is None


def test_the_bucket_query_seeks_the_vendor_time_index(db: Database) -> None:
    """SQLite's plan searches ``ix_image_results_vendor_time`` (vendor equality, time
    range) rather than scanning the table."""
    query = bucket_query(["Aurora Imaging", "Northwind Medical"], utcnow(), BucketSize.HOUR,
                         {"sononode-us-sim": 8.0})
    sql = str(query.compile(db.engine, compile_kwargs={"literal_binds": True}))
    with db.engine.connect() as connection:
        plan = " | ".join(str(row[-1]) for row in
                          connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    assert re.search(r"SEARCH image_results USING INDEX ix_image_results_vendor_time "
                     r"\(manufacturer=\? AND created_at>\?\)", plan), plan


# ----------------------------------------------------------------------------------------
# The pages, without a browser
# ----------------------------------------------------------------------------------------
def _local_urls(html: str) -> list[str]:
    """Every src= and href= of a page; fails on one that names a host."""
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    foreign = [u for u in urls if urlsplit(u).netloc]
    assert not foreign, foreign
    return urls


def test_landing_page_needs_no_token_and_links_the_pages(settings: Settings,
                                                        db: Database) -> None:
    response = TestClient(create_app(settings, db)).get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    urls = _local_urls(response.text)
    assert {"/dashboard", "/docs", "/health", "/ready", "/metrics"} <= set(urls)
    assert "simulated" in response.text and settings.ae_title in response.text


@pytest.mark.parametrize("page", ["/docs", "/dashboard"])
def test_pages_load_their_assets_from_the_node(settings: Settings, db: Database,
                                               page: str) -> None:
    """The HTML names no other host, and every script and style it names is served."""
    client = TestClient(create_app(settings, db))
    response = client.get(page)
    assert response.status_code == 200
    assets = [u for u in _local_urls(response.text) if u.endswith((".js", ".css"))]
    assert assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert client.get("/openapi.json").json()["info"]["title"] == "sononode"


def test_no_redoc(settings: Settings, db: Database) -> None:
    """ReDoc's bundle loads its logo from cdn.redoc.ly whatever its options: not served."""
    assert TestClient(create_app(settings, db)).get("/redoc").status_code == 404


def test_vendored_libraries_carry_their_licence() -> None:
    static = Path(__file__).resolve().parents[1] / "node" / "api" / "static"
    for library in (static / "vendor").iterdir():
        assert (library / "LICENSE").is_file(), library
        assert re.search(r"\d+\.\d+\.\d+", (library / "README.md").read_text()), library


# ----------------------------------------------------------------------------------------
# In Chromium, against a running node
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PageReport:
    """What ``tests/browser/page.cjs`` saw of one page."""

    raw: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.raw["text"])

    def console_errors(self) -> list[dict[str, Any]]:
        return [m for m in self.raw["console"] if m["type"] == "error"]

    def assert_clean(self, origin: str) -> None:
        """Loaded, nothing asked of another host, no failed load, no error logged."""
        assert self.raw["error"] is None, self.raw["error"]
        assert self.raw["foreign"] == [], self.raw["foreign"]
        assert self.raw["requests"], "the page made no request"
        assert all(r["url"].startswith(("data:", "blob:")) or
                   urlsplit(r["url"])._replace(path="", query="", fragment="").geturl()
                   == origin for r in self.raw["requests"]), self.raw["requests"]
        assert self.raw["failed"] == [], self.raw["failed"]
        assert self.console_errors() == [], self.raw["console"]
        assert self.raw["pageErrors"] == [], self.raw["pageErrors"]


def _require_browser() -> None:
    """Chromium, Node.js and the harness's npm packages (installed from its lock file)."""
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        skip_or_fail("chromium is not installed (apt-get install chromium)")
    require_npm_packages(HARNESS)


def browse(url: str, *, wait: str, screenshot: Path, full_page: bool = True) -> PageReport:
    """Load ``url`` in headless Chromium (1280x800) until ``wait`` matches."""
    done = subprocess.run(
        ["node", str(HARNESS / "page.cjs"), "--url", url, "--wait", wait,
         "--screenshot", str(screenshot), "--timeout", "60000",
         *(["--full-page"] if full_page else [])],
        capture_output=True, text=True, timeout=180, check=False, cwd=HARNESS)
    assert done.returncode == 0, done.stderr[-3000:]
    return PageReport(json.loads(done.stdout))


def _assert_png(path: Path, keep_as: str) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, path
    shutil.copyfile(path, keep_as)


VENDORS = ("Northwind Medical", "Aurora Imaging")


def _send(port: int, files: list[Path]) -> None:
    """C-STORE ``files`` to the node as a modality would (pynetdicom)."""
    ae = AE(ae_title="MODALITY")
    for context in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                    for d in (dcmread(f, stop_before_pixels=True) for f in files)}:
        ae.add_requested_context(context[0], [context[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="SONONODE")
    assert assoc.is_established
    try:
        for path in files:
            assert int(assoc.send_c_store(path).Status) == 0, path
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """``sononode up`` that has analysed one small simulated study of each vendor."""
    _require_browser()
    from simulator import simulate_study

    running = start_node(tmp_path_factory.mktemp("pages") / "data", extra_env={
        "SONONODE_API_TOKENS": f"admin:{ADMIN_TOKEN},reader:{READER_TOKEN}"})
    try:
        for seed, vendor in enumerate(VENDORS, start=41):
            out = tmp_path_factory.mktemp(f"study{seed}")
            simulate_study(out, seed=seed, vendor=vendor, n_images=2, size=(300, 400))
            _send(running.dicom_port, sorted(out.glob("**/*.dcm")))

        def analysed() -> bool:
            streams = running.get("/dashboard/data?window=24h")["streams"]
            return set(VENDORS) <= {s["vendor"] for s in streams}

        wait_for(analysed, timeout=240, interval=0.5, what="both vendors' studies analysed")
        yield running
    finally:
        running.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboard_in_chromium(node: Node, tmp_path: Path) -> None:
    report = browse(f"{node.url}/dashboard#token={READER_TOKEN}",
                    wait='body[data-state="ready"]', screenshot=tmp_path / "dashboard.png")
    report.assert_clean(node.url)
    _assert_png(tmp_path / "dashboard.png", "/tmp/sononode-dashboard.png")
    # The token left the address bar for this tab's session storage.
    assert report.raw["href"] == f"{node.url}/dashboard"
    assert report.raw["sessionStorageKeys"] == ["sononode.dashboard.token"]
    fetched = {urlsplit(r["url"]).path for r in report.raw["requests"] if r["type"] == "fetch"}
    assert {"/dashboard/data", "/drift"} <= fetched
    for vendor in VENDORS:
        assert vendor in report.text, vendor
    assert "Ready" in report.text and "Images analysed" in report.text
    # Drift: each stream with its status, and the selected one's signals over time.
    streams = node.get("/drift")["streams"]
    if not streams:
        assert "No stream monitored yet" in report.text
    for stream in streams:
        assert stream["vendor_as_sent"] in report.text, stream
        assert f"{stream['model']} ({stream['status']})" in report.text, stream  # the select
    if streams:
        assert any(path.startswith("/drift/") for path in fetched), fetched


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_asks_for_a_token_the_node_refuses(node: Node, tmp_path: Path) -> None:
    report = browse(f"{node.url}/dashboard#token=not-a-valid-token",
                    wait='body[data-state="auth"]', screenshot=tmp_path / "refused.png",
                    full_page=False)
    assert report.raw["error"] is None and report.raw["foreign"] == []
    assert "not accepted (401" in report.text
    assert report.raw["sessionStorageKeys"] == []
    # The refused fetch is the one error Chromium logs.
    assert all("401" in m["text"] for m in report.console_errors()), report.raw["console"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_swagger_ui_in_chromium(node: Node, tmp_path: Path) -> None:
    openapi = httpx.get(f"{node.url}/openapi.json", timeout=10).json()
    operations = sum(1 for methods in openapi["paths"].values() for method in methods
                     if method in {"get", "post", "put", "patch", "delete"})
    docs = browse(f"{node.url}/docs", wait=".opblock", screenshot=tmp_path / "docs.png")
    docs.assert_clean(node.url)
    assert docs.raw["waitMatches"] == operations
    assert "/dashboard/data" in docs.text
    _assert_png(tmp_path / "docs.png", "/tmp/sononode-docs.png")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_landing_page_in_chromium(node: Node, tmp_path: Path) -> None:
    report = browse(f"{node.url}/", wait="a[href='/dashboard']",
                    screenshot=tmp_path / "landing.png")
    report.assert_clean(node.url)
    _assert_png(tmp_path / "landing.png", "/tmp/sononode-landing.png")
    assert "Not for clinical use" in report.text and "simulated" in report.text
