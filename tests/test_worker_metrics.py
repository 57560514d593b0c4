"""A worker on a host without the node's data volume serves its own /metrics.

Its processes write prometheus-client's multiprocess files to the host's own
``<data>/metrics``, which the API never reads; ``SONONODE_METRICS_PORT`` serves them.
Here a separate process plays the worker's pool process (it counts predictions and
exits), and the endpoint is scraped over HTTP and parsed as Prometheus parses it, then by a
real Prometheus server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from harness.peers import get_port, running_prometheus, wait_for
from node.config import Settings
from node.metrics import serve_own_metrics

POOL_PROCESS = """
from node.metrics import PREDICTIONS
PREDICTIONS.labels(model="sononode-us-sim", task="view", label="thyroid_transverse",
                   vendor="Kestrel Sonics", abstained="false").inc(3)
"""


def _settings(data: Path, **values: object) -> Settings:
    return Settings(data_dir=data, **values)  # type: ignore[arg-type]


def _worker_settings(data: Path) -> Settings:
    """A worker's settings with its endpoint on, after one pool process counted three
    predictions into its multiprocess files."""
    settings = _settings(data, metrics_port=get_port(), metrics_open=True)
    folder = settings.process_metrics_dir
    folder.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", POOL_PROCESS], env=env, check=True, timeout=120)
    return settings


def test_a_worker_serves_the_metrics_of_its_own_processes(tmp_path: Path) -> None:
    settings = _worker_settings(tmp_path)

    server = serve_own_metrics(settings)
    assert server is not None
    try:
        response = httpx.get(f"http://{settings.http_host}:{settings.metrics_port}/metrics",
                             timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text)
               for s in family.samples}
    key = ("sononode_predictions_total",
           (("abstained", "false"), ("label", "thyroid_transverse"), ("model", "sononode-us-sim"),
            ("task", "view"), ("vendor", "Kestrel Sonics")))
    assert samples[key] == 3.0


def test_no_endpoint_unless_asked_and_never_one_that_asks_no_token_silently(
        tmp_path: Path) -> None:
    assert serve_own_metrics(_settings(tmp_path)) is None
    with pytest.raises(ValidationError, match="SONONODE_METRICS_OPEN=true"):
        _settings(tmp_path, metrics_port=9101)


@pytest.mark.slow
def test_prometheus_scrapes_a_worker_pod_by_pod(tmp_path: Path) -> None:
    """The scrape ``deploy/k8s/README.md`` describes, by a real Prometheus: a job with no
    credentials on the worker's metrics port sees the pool process's counts, labelled
    with the instance they came from."""
    if shutil.which("prometheus") is None:
        pytest.skip("apt-get install prometheus")
    settings = _worker_settings(tmp_path / "worker")
    server = serve_own_metrics(settings)
    assert server is not None
    target = f"{settings.http_host}:{settings.metrics_port}"
    config = {"global": {"scrape_interval": "2s"},
              "scrape_configs": [{"job_name": "sononode-worker-gpu",
                                  "static_configs": [{"targets": [target]}]}]}
    try:
        with running_prometheus(tmp_path / "prometheus", config) as prometheus:
            found = wait_for(lambda: prometheus.query("sononode_predictions_total"),
                             timeout=120, interval=1, what="the worker's predictions scraped")
            (up,) = prometheus.query("up")
    finally:
        server.shutdown()
        server.server_close()
    (sample,) = found
    assert sample["metric"]["job"] == "sononode-worker-gpu"
    assert sample["metric"]["instance"] == target
    assert sample["metric"]["vendor"] == "Kestrel Sonics"
    assert float(sample["value"][1]) == 3.0
    assert float(up["value"][1]) == 1.0
