"""The compose deployment agrees with the CLI and the monitoring assets (Docker does not
run here: parse and check; with Docker Compose v2 on the PATH, it renders the file too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
#: Secrets compose refuses to start without.
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SONONODE_API_TOKENS",
           "GRAFANA_ADMIN_PASSWORD")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_services_present(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("listener", "api", "scheduler", "worker-cpu", "worker-gpu", "redis",
                 "postgres", "prometheus", "grafana", "orthanc"):
        assert name in services, name


def test_node_commands_exist_in_the_cli(compose: dict[str, Any]) -> None:
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


def _wants_gpu(service: dict[str, Any]) -> bool:
    devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
               .get("devices", []))
    return "gpus" in service or any("gpu" in d.get("capabilities", []) for d in devices)


def test_gpu_worker_requests_gpus_only_in_its_profile(compose: dict[str, Any]) -> None:
    """`docker compose up` starts on a host without GPU: only services of the `gpu`
    profile reserve one, and without it a worker still serves the cpu queue (which gets
    the inference while no GPU worker can analyse)."""
    services = compose["services"]
    worker = services["worker-gpu"]
    assert worker.get("gpus") == "all"
    assert worker["profiles"] == ["gpu"]
    for name, service in services.items():
        if _wants_gpu(service):
            assert service.get("profiles") == ["gpu"], name
    default = {name for name, service in services.items() if "profiles" not in service}
    assert {"listener", "api", "scheduler", "worker-cpu", "prometheus", "grafana"} <= default
    assert services["worker-cpu"]["command"] == ["worker", "--queues", "cpu"]
    header = (ROOT / "docker-compose.yml").read_text().split("\nx-sononode")[0]
    assert "docker compose up -d" in header and "--profile gpu up -d" in header


def test_shared_spool_and_declared_volumes(compose: dict[str, Any]) -> None:
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


def test_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("listener", "api", "redis", "postgres", "prometheus", "grafana", "orthanc"):
        assert "healthcheck" in services[name], name
    for name in ("listener", "api", "scheduler", "worker-cpu", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"


def test_secrets_have_no_defaults() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in SECRETS:
        assert f"${{{secret}:?Variable not set}}" in text, secret
        assert f"${{{secret}:-" not in text and f"${{{secret}-" not in text, secret


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (host path or volume, read-only) of a service's volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def test_prometheus_scrapes_the_api_with_the_rules_mounted(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "sononode"  # the alerts select up{job="sononode"}
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    assert compose["services"]["api"]["environment"]["SONONODE_HTTP_PORT"] == "8000"
    mounts = _mounts(compose["services"]["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == ("./deploy/prometheus/prometheus.yml",
                                                        True)
    for rule_file in config["rule_files"]:
        source, read_only = mounts[rule_file]
        assert read_only and (ROOT / source).is_file(), rule_file
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert {"SononodeDrift", "SononodeSevereFindingShare", "SononodeAbstentionSpike",
            "SononodeQCFailSpike", "SononodeExportsDeadLettered", "SononodeExportBacklog",
            "SononodeQueueBacklog", "SononodeWorkerLost", "SononodeNoWorkerCanAnalyse"} <= names
    assert "sononode_drift_psi" not in (ROOT / "deploy/prometheus/alerts.yml").read_text()


def test_grafana_is_provisioned_read_only_and_offline(compose: dict[str, Any]) -> None:
    """Pinned image, provisioning and dashboards mounted read-only where the provider
    reads them, the datasource on the compose Prometheus, no anonymous access, no
    plugin from the internet, the admin password from the environment."""
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana-oss" and tag[:1].isdigit() and tag.count(".") == 2
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == ("./deploy/grafana/provisioning", True)
    (provider,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/sononode.yml").read_text())["providers"]
    source, read_only = mounts[provider["options"]["path"]]
    assert read_only and (ROOT / source / "sononode.json").is_file()
    assert provider["allowUiUpdates"] is False
    (datasource,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    assert compose["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    dashboard = json.loads((ROOT / source / "sononode.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:?Variable not set}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_PLUGINS_PREINSTALL_DISABLED"] == "true"
    assert not {"GF_INSTALL_PLUGINS", "GF_PLUGINS_PREINSTALL",
                "GF_PLUGINS_PREINSTALL_SYNC"} & env.keys()
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(
        provider["options"]["path"] + "/")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def _compose_v2() -> list[str] | None:
    """A Docker Compose v2 command line, if one is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version", "--short"], capture_output=True,
                              text=True, timeout=30, check=False)
        if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


def test_docker_compose_renders_with_and_without_gpu(tmp_path: Path) -> None:
    """Docker Compose itself validates the file: it renders with every secret given,
    refuses without one, and starts the GPU worker only with `--profile gpu`."""
    command = _compose_v2()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (docker compose / docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update({secret: "test-secret" for secret in SECRETS})
    base = [*command, "--project-directory", str(ROOT), "-f",
            str(ROOT / "docker-compose.yml")]

    def services(*profile: str,
                 environment: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *profile, "config", "--services"], capture_output=True,
                              text=True, timeout=60, check=False, env=environment, cwd=tmp_path)

    plain, gpu = services(), services("--profile", "gpu")
    assert plain.returncode == 0 and gpu.returncode == 0, plain.stderr + gpu.stderr
    assert "worker-gpu" not in plain.stdout.split() and "worker-cpu" in plain.stdout.split()
    assert set(gpu.stdout.split()) == set(plain.stdout.split()) | {"worker-gpu"}
    for secret in SECRETS:
        refused = services(environment={k: v for k, v in env.items() if k != secret})
        assert refused.returncode != 0 and secret in refused.stderr, secret


def test_no_secret_in_compose_and_http_only_on_loopback(compose: dict[str, Any]) -> None:
    """Every secret comes from the environment (compose refuses to start without it), and
    no HTTP port is published beyond the host's loopback."""
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in SECRETS:
        assert f"${{{secret}:?" in text, secret
    for name in ("api", "prometheus", "grafana", "orthanc"):
        for port in compose["services"][name].get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "--requirepass" in compose["services"]["redis"]["command"]
