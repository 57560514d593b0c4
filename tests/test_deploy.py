"""The compose deployment agrees with the CLI (Docker does not run here: parse and check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from node.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_services_present(compose: dict) -> None:
    services = compose["services"]
    for name in ("listener", "api", "scheduler", "worker-cpu", "worker-gpu", "redis",
                 "postgres", "prometheus", "orthanc"):
        assert name in services, name


def test_node_commands_exist_in_the_cli(compose: dict) -> None:
    commands = _subcommands()
    for name, service in compose["services"].items():
        if service.get("image") != "sononode:latest":
            continue
        command = service["command"]
        assert command[0] in commands, f"{name}: {command[0]} is not a sononode subcommand"
        # The arguments parse with the real parser.
        build_parser().parse_args(command)
    queues = {compose["services"][w]["command"][2] for w in ("worker-cpu", "worker-gpu")}
    assert queues == {"cpu", "gpu"}


def test_gpu_worker_requests_gpus(compose: dict) -> None:
    worker = compose["services"]["worker-gpu"]
    assert worker.get("gpus") == "all"


def test_shared_spool_and_declared_volumes(compose: dict) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in declared, f"{name}: volume {source} not declared"
            else:
                assert (ROOT / source).exists(), f"{name}: {source} missing"
        if service.get("image") == "sononode:latest":
            assert "spool:/data" in service["volumes"]
            env = service["environment"]
            assert env["SONONODE_DATA_DIR"] == "/data"
            assert env["SONONODE_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?")
            assert env["SONONODE_DATABASE_URL"].startswith("postgresql+psycopg://")
            # One metrics folder per container: process ids repeat across containers.
            assert env["SONONODE_METRICS_SUBDIR"] == name
            assert "PROMETHEUS_MULTIPROC_DIR" not in env  # the CLI sets it from the settings


def test_healthchecks_and_dependencies(compose: dict) -> None:
    services = compose["services"]
    for name in ("listener", "api", "redis", "postgres", "prometheus", "orthanc"):
        assert "healthcheck" in services[name], name
    for name in ("listener", "api", "scheduler", "worker-cpu", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"


def test_secrets_have_no_defaults() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["api:8000"]
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in alerts["groups"] for r in g["rules"])
    assert "sononode_drift_psi" in exprs and "sononode_exports" in exprs


def test_no_secret_in_compose_and_http_only_on_loopback(compose: dict) -> None:
    """Every secret comes from the environment (compose refuses to start without it), and
    no HTTP port is published beyond the host's loopback."""
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SONONODE_API_TOKENS"):
        assert f"${{{secret}:?" in text, secret
    for name in ("api", "prometheus", "orthanc"):
        for port in compose["services"][name].get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "--requirepass" in compose["services"]["redis"]["command"]
