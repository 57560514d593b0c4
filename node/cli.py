"""The ``sononode`` command line, and the node's composition root.

``sononode up`` runs the whole node on one machine; ``listener``, ``api``, ``worker``
and ``scheduler`` run one role each (what the compose deployment uses); ``echo`` and
``send`` talk to a DICOM peer; ``simulate`` writes simulated studies; ``model`` is the
model toolkit. This is the one module of ``node/`` that imports ``workers`` (and the
tooling packages): it wires the Celery dispatcher and the model catalogue into the
scheduler and the API, which know only their interfaces.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from node.auth import TokenError
from node.config import Settings

logger = logging.getLogger("sononode")

#: How long a role waits for its database at start before it exits (and is restarted).
ROLE_DATABASE_WAIT = 30.0


def _setup(role: str) -> Settings:
    """Settings, logging and the metrics directory, before any metric is created."""
    from node.config import get_settings
    from node.logs import configure

    settings = get_settings()
    configure(role, level=settings.log_level, fmt=settings.log_format)
    # prometheus-client picks its storage mode when it is first imported, so its
    # multiprocess folder must be in the environment before anything imports node.metrics.
    metrics_dir = settings.process_metrics_dir.resolve()
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return settings


def _cmd_up(_: argparse.Namespace) -> int:
    from node.supervisor import run_up

    settings = _setup("up")
    check_ports(settings)
    return run_up(settings)


def _cmd_listener(_: argparse.Namespace) -> int:
    settings = _setup("listener")
    from node.db import open_database
    from node.listener import start_listener

    db = open_database(settings.effective_database_url, settings.data_dir,
                       wait_seconds=ROLE_DATABASE_WAIT)
    try:
        start_listener(settings, db, block=True)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_api(_: argparse.Namespace) -> int:
    settings = _setup("api")
    import uvicorn

    from node.api import create_app
    from node.broker import redis_client_url
    from node.db import open_database
    from workers.dispatch import celery_dispatcher
    from workers.models.manifest import describe_packs

    db = open_database(settings.effective_database_url, settings.data_dir,
                       wait_seconds=ROLE_DATABASE_WAIT)
    app = create_app(
        settings, db,
        dispatcher=celery_dispatcher(),
        redis_url=redis_client_url(settings),
        models_catalogue=lambda: describe_packs(settings.effective_model_packs),
        multiprocess_metrics=True,
    )
    uvicorn.run(app, host=settings.http_host, port=settings.http_port,
                log_level=settings.log_level.lower())
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if "gpu" in queues:
        # Inference workers load their packs at start, not on the first study.
        os.environ.setdefault("SONONODE_PRELOAD_MODELS", "1")
    settings = _setup("worker")
    from node.metrics import serve_own_metrics
    from workers.celery_app import app

    try:
        serve_own_metrics(settings)
    except OSError as exc:
        raise PortInUse(f"the metrics port {settings.http_host}:{settings.metrics_port} is not "
                        f"free ({exc.strerror}); stop what uses it or set "
                        "SONONODE_METRICS_PORT") from exc

    concurrency = args.concurrency or settings.worker_concurrency
    app.worker_main(
        [
            "worker",
            "--queues", ",".join(queues),
            "--concurrency", str(concurrency),
            "--pool", "prefork",
            "--hostname", f"sononode-{'-'.join(queues)}@%h",
            "--loglevel", settings.log_level.upper(),
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _cmd_scheduler(_: argparse.Namespace) -> int:
    settings = _setup("scheduler")
    import signal
    import threading

    from node.db import open_database
    from node.scheduler import run_scheduler
    from workers.dispatch import celery_dispatcher

    db = open_database(settings.effective_database_url, settings.data_dir,
                       wait_seconds=ROLE_DATABASE_WAIT)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from node.retention import purge
    from node.spool import Spool
    from node.storage import open_store

    spool = Spool(settings.spool_dir, settings.incoming_dir)

    def purge_expired() -> object:
        # The store is opened here, not at start: one this host cannot open costs the
        # hourly retention run (logged by the scheduler), never the scheduling.
        return purge(db, spool, days=settings.retention_days, store=open_store(settings, spool))

    retention = purge_expired if settings.retention_days > 0 else None
    run_scheduler(
        db,
        celery_dispatcher(),
        stable_seconds=settings.study_stable_seconds,
        interval_seconds=settings.scheduler_interval_seconds,
        stale_seconds=settings.stale_job_seconds,
        export_grace_seconds=settings.export_retry_backoff_max_seconds,
        stop=stop,
        retention=retention,
    )
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    settings = _setup("purge")
    from node.db import open_database
    from node.retention import purge
    from node.spool import Spool
    from node.storage import StorageError, open_store

    days = args.days if args.days is not None else settings.retention_days
    if days <= 0:
        print("no retention: give --days N or set SONONODE_RETENTION_DAYS", file=sys.stderr)
        return 2
    db = open_database(settings.effective_database_url, settings.data_dir)
    spool = Spool(settings.spool_dir, settings.incoming_dir)
    try:
        store = open_store(settings, spool)
    except StorageError as exc:
        print(f"cannot open the instance store: {exc}", file=sys.stderr)
        return 2
    report = purge(db, spool, days=days, dry_run=args.dry_run, actor="cli", store=store)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {report.files} file(s), {report.bytes} bytes, of {report.studies} "
          f"study(ies) ended more than {days:g} days ago")
    return 0


def _cmd_reanalyse(args: argparse.Namespace) -> int:
    settings = _setup("reanalyse")
    from node import audit, jobs
    from node.db import open_database

    db = open_database(settings.effective_database_url, settings.data_dir)
    try:
        with db.session() as session:
            job = jobs.reanalyse(session, args.study_uid)
            audit.record(session, "cli", audit.Action.REANALYSE, study=args.study_uid,
                         detail={"job": job.id, "reason": args.reason})
            job_id = job.id
    except (jobs.NotFound, jobs.Conflict) as exc:
        print(f"sononode: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.study_uid}: re-analysis queued as job {job_id}; the scheduler "
          f"dispatches it within {settings.scheduler_interval_seconds * 10:g} s and its SR "
          "supersedes the study's latest")
    return 0


def _cmd_feedback_export(args: argparse.Namespace) -> int:
    settings = _setup("feedback")
    from node import audit
    from node.db import open_database
    from node.feedback import export_cases
    from node.spool import Spool

    db = open_database(settings.effective_database_url, settings.data_dir)
    with db.session() as session:
        done = export_cases(session, Spool(settings.spool_dir, settings.incoming_dir),
                            args.out)
        audit.record(session, "cli", audit.Action.FEEDBACK,
                     detail={"exported": done.images, "to": str(args.out)})
    print(f"{done.images} image(s) with {done.labels} confirmed label(s) in {args.out} "
          f"(labels.csv); train with: sononode model train --data {args.out}")
    if done.missing:
        print(f"{len(done.missing)} image(s) no longer in the spool (retention) were left out",
              file=sys.stderr)
    return 0


def _peer(args: argparse.Namespace) -> tuple[str, int, str]:
    from node.config import get_settings

    settings = get_settings()
    return args.host, args.port or settings.dicom_port, args.aet or settings.ae_title


def _cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE

    host, port, aet = _peer(args)
    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"cannot associate with {aet}@{host}:{port}", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and status.Status == 0
    print(f"C-ECHO {aet}@{host}:{port}: {'Success' if ok else status}")
    return 0 if ok else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pynetdicom import AE

    host, port, aet = _peer(args)
    files: list[Path] = []
    for item in args.paths:
        path = Path(item)
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    datasets = []
    for path in files:
        try:
            datasets.append((path, dcmread(path, stop_before_pixels=True)))
        except Exception as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
    ae = AE(ae_title=args.calling_aet)
    for cx in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for _, ds in datasets}:
        ae.add_requested_context(cx[0], [cx[1]])
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"cannot associate with {aet}@{host}:{port}", file=sys.stderr)
        return 1
    failures = 0
    for path, _ in datasets:
        status = assoc.send_c_store(path)
        code = status.Status if status else None
        if code != 0:
            failures += 1
            print(f"{path}: failed ({'no response' if code is None else f'0x{code:04X}'})")
    assoc.release()
    print(f"sent {len(datasets) - failures}/{len(datasets)} instance(s) to {aet}@{host}:{port}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``simulate`` and ``model`` pass their rest on)."""
    parser = argparse.ArgumentParser(prog="sononode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole node on this machine").set_defaults(func=_cmd_up)
    sub.add_parser("listener", help="DICOM listener (C-ECHO, C-STORE)").set_defaults(
        func=_cmd_listener)
    sub.add_parser("api", help="HTTP API").set_defaults(func=_cmd_api)
    worker = sub.add_parser("worker", help="Celery worker")
    worker.add_argument("--queues", default="cpu,gpu", help="comma-separated: cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=_cmd_worker)
    sub.add_parser("scheduler", help="study completion and reconciliation").set_defaults(
        func=_cmd_scheduler)
    purge_parser = sub.add_parser("purge", help="delete spooled pixel data past the retention")
    purge_parser.add_argument("--days", type=float, default=None,
                              help="default: SONONODE_RETENTION_DAYS")
    purge_parser.add_argument("--dry-run", action="store_true", help="only count")
    purge_parser.set_defaults(func=_cmd_purge)
    reanalyse_parser = sub.add_parser("reanalyse",
                                      help="analyse a study again (its SR supersedes the last)")
    reanalyse_parser.add_argument("study_uid")
    reanalyse_parser.add_argument("--reason", default="", help="kept in the audit trail")
    reanalyse_parser.set_defaults(func=_cmd_reanalyse)
    feedback_parser = sub.add_parser("feedback", help="readers' verdicts on AI results")
    feedback_sub = feedback_parser.add_subparsers(dest="feedback_command", required=True)
    export_parser = feedback_sub.add_parser(
        "export", help="agreed and corrected results as DICOM files and a labels.csv that "
        "'sononode model train --data' reads")
    export_parser.add_argument("--out", type=Path, required=True)
    export_parser.set_defaults(func=_cmd_feedback_export)
    for name, func, text in (("echo", _cmd_echo, "C-ECHO a DICOM peer"),
                             ("send", _cmd_send, "C-STORE files or folders to a DICOM peer")):
        p = sub.add_parser(name, help=text)
        if name == "send":
            p.add_argument("paths", nargs="+")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=None, help="default: SONONODE_DICOM_PORT")
        p.add_argument("--aet", default=None, help="called AE title (default: the node's)")
        p.add_argument("--calling-aet", default="SONOSCU")
        p.set_defaults(func=func)
    sub.add_parser("simulate", help="write simulated ultrasound studies (see --help)",
                   add_help=False)
    sub.add_parser("model", help="model toolkit: train, calibrate, threshold, evaluate, "
                   "distill, import-sononet, info (see --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sononode`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        from simulator.cli import main as simulate_main

        return simulate_main(argv[1:])
    if argv and argv[0] == "model":
        if len(argv) > 1 and argv[1] == "info":
            from modelkit.info import main as info_main

            return info_main(argv[2:])
        if len(argv) > 1 and argv[1] == "import-sononet":
            from modelkit.sononet_import import main as sononet_main

            return sononet_main(argv[2:])
        from modelkit.cli import main as model_main

        return model_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:
        for line in describe_settings_error(exc):
            print(f"sononode: {line}", file=sys.stderr)
        return 2
    except TokenError as exc:
        print(f"sononode: {exc}", file=sys.stderr)
        return 2
    except PortInUse as exc:
        print(f"sononode: {exc}", file=sys.stderr)
        return 2


class PortInUse(RuntimeError):
    """A port the node must listen on is taken."""


def check_ports(settings: Settings) -> None:
    """Fail with one clear line when the DICOM or HTTP port is already in use."""
    import socket

    for what, host, port, variable in (
            ("DICOM", settings.dicom_host, settings.dicom_port, "SONONODE_DICOM_PORT"),
            ("HTTP", settings.http_host, settings.http_port, "SONONODE_HTTP_PORT")):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise PortInUse(f"the {what} port {host}:{port} is not free ({exc.strerror}); "
                                f"stop what uses it or set {variable}") from exc


def describe_settings_error(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming its ``SONONODE_*`` variable."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = f"SONONODE_{field.upper()}" if field else "settings"
        message = error["msg"].removeprefix("Value error, ")
        allowed = error.get("ctx", {}).get("expected")
        lines.append(f"{variable}: {message}" + (f" (allowed: {allowed})" if allowed and
                                                 str(allowed) not in message else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
