"""The API's only link to the worker: a task name and a job id, sent through the broker."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from celery import Celery

from app.settings import Settings

logger = logging.getLogger(__name__)

TRAIN_TASK = "sgjobs.train_job"
# The pool of workers that takes jobs without a spec `queue` (named so in messages).
DEFAULT_POOL = "default"


def queue_for(settings: Settings, pool: str | None, gpus: int = 1) -> str:
    """The broker queue of a worker pool's jobs of `gpus` GPUs: `task_queue` for the default pool
    (None or ""), else `<task_queue>.<pool>`; then `.gpus<N>` for N > 1. Every sender and every
    worker goes through here, so they agree: a slot of N GPUs consumes the queues of 1..N
    (`sgjobs worker --gpus-per-slot`). A pool name has no dot (`POOL_PATTERN`), so no pool's queue
    is another's."""
    base = f"{settings.task_queue}.{pool}" if pool else settings.task_queue
    return f"{base}.gpus{gpus}" if gpus > 1 else base


def worker_queues(settings: Settings) -> list[str]:
    """The queues a worker of `settings` consumes: its pool's, for jobs of 1 to
    `worker_gpus_per_slot` GPUs (a slot of N GPUs also trains smaller jobs)."""
    sizes = range(1, settings.worker_gpus_per_slot + 1)
    return [queue_for(settings, settings.worker_queue, n) for n in sizes]


def is_embedded_broker(broker_url: str) -> bool:
    """Whether `broker_url` names the embedded broker (SQLite through kombu's SQLAlchemy transport),
    which a worker polls (`Settings.broker_poll_seconds`); Redis pushes."""
    return broker_url.startswith("sqla+")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Shared by the API's producer and the worker's app, so both agree on queue and transport."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.task_queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.task_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # A training message is acknowledged only after the task ends, one at a time per worker: a
        # worker that dies mid-training leaves the message to be redelivered (and the job's
        # conditional claim makes the redelivery a no-op).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {},
    }
    if is_embedded_broker(settings.broker_url):
        # Options here go to create_engine: wait on SQLite's lock rather than fail when the API and
        # the worker touch the broker file at the same moment.
        config["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "visibility_timeout": settings.broker_visibility_timeout_seconds
        }
    return config


@lru_cache(maxsize=4)
def _producer(broker: str, queue: str) -> Celery:
    settings = Settings(broker_url=broker, task_queue=queue)
    app = Celery("sgjobs-api")
    app.conf.update(celery_config(settings))
    return app


def send_train_job(settings: Settings, job_id: str, *, pool: str | None = None, gpus: int = 1) -> None:
    """Enqueue a training job by task name on the queue of its pool and GPU count (`queue_for`).
    Raises if the broker cannot be reached. A queue with no live worker keeps the message until one
    starts."""
    app = _producer(settings.broker_url, settings.task_queue)
    app.send_task(
        TRAIN_TASK,
        args=[job_id],
        queue=queue_for(settings, pool, gpus),
        retry=True,
        retry_policy={"max_retries": 2},
    )


def prepare_broker(settings: Settings, attempts: int = 5) -> bool:
    """Declare this process's task queues (`worker_queues`: its pool's, for 1 to
    `worker_gpus_per_slot` GPUs) once, before the API and the worker start using them.

    kombu's SQL transport creates its tables and queue rows with a check-then-insert that races
    when two processes start at the same moment (a UNIQUE error that kills the worker at start-up);
    declaring first, with a retry, leaves both of them nothing to create.
    """
    from kombu import Queue

    app = _producer(settings.broker_url, settings.task_queue)
    for attempt in range(attempts):
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                for name in worker_queues(settings):
                    Queue(name).bind(conn.default_channel).declare()
            return True
        except Exception as exc:
            logger.warning("broker not ready (attempt %d/%d): %s", attempt + 1, attempts, exc)
            time.sleep(0.5 * (attempt + 1))
    return False


def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    """Open and close one broker connection."""
    app = _producer(settings.broker_url, settings.task_queue)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False
