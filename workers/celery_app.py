"""The node's one Celery app, configured from settings.

Queues: ``gpu`` for model inference, ``cpu`` for QC, reports and exports. Messages
carry identifiers only (job and export ids); workers read the spool and the index.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange
from kombu import Queue as KombuQueue

from node.broker import Queue, broker_url
from node.config import Settings, get_settings

logger = logging.getLogger(__name__)

CPU_QUEUE = Queue.CPU.value
GPU_QUEUE = Queue.GPU.value


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``."""
    app = Celery("sononode", broker=broker_url(settings), include=["workers.tasks"])
    app.conf.update(
        task_queues=(
            KombuQueue(CPU_QUEUE, Exchange(CPU_QUEUE), routing_key=CPU_QUEUE),
            KombuQueue(GPU_QUEUE, Exchange(GPU_QUEUE), routing_key=GPU_QUEUE),
        ),
        task_default_queue=CPU_QUEUE,
        task_routes={
            "sononode.infer": {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
        },
        task_default_exchange=CPU_QUEUE,
        task_default_routing_key=CPU_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Late acknowledgement: a task is acknowledged after it ran, so a broker or worker
        # restart redelivers it. A worker process that dies mid-task is NOT requeued
        # (a poison study would loop); the reconciler re-dispatches from the database.
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=max(settings.task_time_limit_seconds - 30, 5),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than the longest task and export backoff, so a slow task is not
            # redelivered while it still runs.
            "visibility_timeout": max(
                settings.task_time_limit_seconds * 2,
                int(settings.export_retry_backoff_max_seconds) * 2,
                3600,
            ),
        },
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=200,
        task_track_started=False,
        enable_utc=True,
    )
    return app


app = make_celery(get_settings())
