"""The Kubernetes manifests (deploy/k8s) render with kustomize and agree with the node.

``kubectl kustomize`` renders the base and the KEDA overlay as a cluster would receive
them; the checks then hold the rendered objects to what the node needs: every command
parses with the real CLI, every ``SONONODE_*`` variable is a setting, selectors and
ports meet, one scheduler, the shared volume is ReadWriteMany, the GPU worker asks for a
GPU and CUDA, secrets only by reference, and the autoscalers watch the Celery queues the
node uses. Every object of a Kubernetes kind is validated against the API's published
schemas, strictly (an unknown field fails), with ``kubernetes-validate`` (its schemas are
bundled: no network); kubeconform, which does the same, does not install on these machines.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.broker import Queue
from node.cli import build_parser
from node.config import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (kustomize) not installed")


def _render(folder: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "deploy" / "k8s" / folder)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=["base", "keda"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(request.param)


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def _node_containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: c for name, d in _of(objects, "Deployment").items()
            for c in _containers(d) if c["image"].startswith("sononode")}


def test_every_object_matches_the_kubernetes_api_schema(objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    unchecked = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(obj["apiVersion"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(map(str, exc.path))}")
    # Only KEDA's custom resources have no schema here (their own checks are below).
    assert set(unchecked) <= {"keda.sh/v1alpha1"}
    assert len(unchecked) < len(objects)


def test_every_role_runs_a_real_command(objects: list[dict[str, Any]]) -> None:
    containers = _node_containers(objects)
    assert set(containers) == {"listener", "api", "scheduler", "worker-cpu", "worker-gpu"}
    for container in containers.values():
        build_parser().parse_args(container["args"])  # exits on an unknown command
    queues = {containers[w]["args"][2] for w in ("worker-cpu", "worker-gpu")}
    assert queues == {Queue.CPU.value, Queue.GPU.value}


def test_every_variable_is_a_setting(objects: list[dict[str, Any]]) -> None:
    fields = {f"SONONODE_{name.upper()}" for name in Settings.model_fields}
    (config,) = _of(objects, "ConfigMap").values()
    names = set(config["data"])
    for container in _node_containers(objects).values():
        names |= {e["name"] for e in container.get("env", [])}
        assert [r["configMapRef"]["name"] for r in container["envFrom"]] == [
            config["metadata"]["name"]]  # the generated (hashed) name, so pods roll on change
    unknown = {n for n in names if n.startswith("SONONODE_")} - fields
    assert not unknown, f"not sononode settings: {sorted(unknown)}"


def test_secrets_only_by_reference(objects: list[dict[str, Any]]) -> None:
    assert not _of(objects, "Secret"), "a Secret with its values must not be in the repository"
    for container in _node_containers(objects).values():
        env = {e["name"]: e for e in container["env"]}
        for name in ("SONONODE_DATABASE_URL", "SONONODE_BROKER_URL", "SONONODE_API_TOKENS"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]


def test_selectors_ports_and_volumes_meet(objects: list[dict[str, Any]]) -> None:
    deployments = _of(objects, "Deployment")
    claims = _of(objects, "PersistentVolumeClaim")
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for volume in d["spec"]["template"]["spec"].get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims, name
    for name, service in _of(objects, "Service").items():
        pods = [d for d in deployments.values()
                if service["spec"]["selector"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"service {name} selects no pods"
        ports = {p["name"] for d in pods for c in _containers(d) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name
    assert claims["sononode-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for container in _node_containers(objects).values():
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


def test_one_scheduler_several_listeners_and_a_gpu_worker(objects: list[dict[str, Any]]
                                                          ) -> None:
    deployments = _of(objects, "Deployment")
    scheduler = deployments["scheduler"]["spec"]
    assert scheduler["replicas"] == 1 and scheduler["strategy"]["type"] == "Recreate"
    assert deployments["listener"]["spec"]["replicas"] >= 2
    containers = _node_containers(objects)
    gpu = containers["worker-gpu"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "SONONODE_DEVICE", "value": "cuda"} in gpu["env"]
    for name, container in containers.items():
        if name != "worker-gpu":
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), name
        assert container["resources"]["requests"] and container["resources"]["limits"], name
    probes = containers["api"]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"


def test_autoscalers_watch_the_celery_queues() -> None:
    objects = _render("keda")
    deployments = _of(objects, "Deployment")
    scalers = _of(objects, "ScaledObject")
    assert set(scalers) == {"worker-cpu", "worker-gpu"}
    for name, scaler in scalers.items():
        assert scaler["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = scaler["spec"]["triggers"]
        queue = _node_containers(objects)[name]["args"][2]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
        assert trigger["authenticationRef"]["name"] in _of(objects, "TriggerAuthentication")
