"""All Prometheus metrics of the node, in one place.

Every process (listener, scheduler, Celery workers, API) writes to prometheus-client's
multiprocess directory; the API aggregates them (``node/api/collectors.py``). The directory
must be in ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is first imported: the
CLI sets it (``node/cli.py``, ``_setup``) before any role imports this module. Without it
(library use, tests) the metrics live in the process's own registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from node.config import Settings

_TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

INSTANCES_RECEIVED = Counter(
    "sononode_instances_received_total",
    "Instances received over DICOM and made durable, by vendor and outcome (stored/duplicate).",
    ["vendor", "outcome"],
)
INSTANCES_REJECTED = Counter(
    "sononode_instances_rejected_total",
    "C-STORE requests answered with a failure status, by reason.",
    ["reason"],
)
CONNECTIONS_REFUSED = Counter(
    "sononode_connections_refused_total",
    "DICOM connections or associations refused before any data, by reason (address, "
    "per_peer_limit, no_request, tls_handshake, disk_full).",
    ["reason"],
)
RECEIVE_SECONDS = Histogram(
    "sononode_store_seconds",
    "Time from a C-STORE request being decoded to its status (parse, fsync, index).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STUDIES_COMPLETED = Counter(
    "sononode_studies_completed_total",
    "Studies found complete (stable) and queued for analysis.",
)
STUDIES_REPORTED = Counter(
    "sononode_studies_reported_total",
    "Study reports produced, by whether they ask for human review.",
    ["needs_review"],
)
STUDIES_FAILED = Counter(
    "sononode_studies_failed_total",
    "Studies whose analysis failed for good, without a report (see /studies?state=failed).",
)
TASK_SECONDS = Histogram(
    "sononode_task_seconds",
    "Celery task durations, by task.",
    ["task"],
    buckets=_TASK_BUCKETS,
)
TASK_FAILURES = Counter(
    "sononode_task_failures_total",
    "Celery task failures (after retries), by task.",
    ["task"],
)
TASK_RETRIES = Counter(
    "sononode_task_retries_total",
    "Celery task retries, by task.",
    ["task"],
)
EXPORTS = Counter(
    "sononode_exports_total",
    "SR export attempts, by destination and outcome (sent/retry/dead).",
    ["destination", "outcome"],
)
EXPORT_FAILURES = Counter(
    "sononode_export_failures_total",
    "SR export attempts that failed (before or after the retry budget), by destination.",
    ["destination"],
)
QC_CHECKS = Counter(
    "sononode_qc_checks_total",
    "QC checks that did not pass, by reason code, outcome and vendor.",
    ["reason", "outcome", "vendor"],
)
IMAGES_ANALYSED = Counter(
    "sononode_images_analysed_total",
    "Images (or cine loops) analysed, by vendor and QC outcome.",
    ["vendor", "qc_outcome"],
)
PREDICTIONS = Counter(
    "sononode_predictions_total",
    "Model outputs per image, by model, task, label, vendor and whether it abstained.",
    ["model", "task", "label", "vendor", "abstained"],
)
CONFIDENCE = Histogram(
    "sononode_prediction_confidence",
    "Calibrated confidence of the predicted label, by model, task and vendor.",
    ["model", "task", "vendor"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
SCHEDULER_RECONCILED = Counter(
    "sononode_reconciled_total",
    "Stale jobs or exports re-dispatched by the reconciler, by kind.",
    ["kind"],
)
MODEL_LOADED = Gauge(
    "sononode_model_loaded",
    "1 for each model pack loaded in a worker process.",
    ["model", "version", "device"],
    multiprocess_mode="livemax",
)


def serve_own_metrics(settings: Settings) -> WSGIServer | None:
    """Serve this host's metrics files at ``SONONODE_METRICS_PORT`` (``None`` when it is 0).

    For a worker on a host that does not mount the node's data volume (a GPU host reading
    instances from the object store): its processes write their multiprocess files to its
    own ``<data>/metrics``, which the API never sees, so Prometheus scrapes it here instead.
    prometheus-client's own server, in a thread of the calling process (the Celery main
    process, before it forks its pool).
    """
    if not settings.metrics_port:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(settings.process_metrics_dir))  # type: ignore[no-untyped-call]
    server, _ = start_http_server(settings.metrics_port, addr=settings.http_host,
                                  registry=registry)
    return server
