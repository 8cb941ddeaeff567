"""The Celery application of the training worker."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals

from app.queue import celery_config, is_embedded_broker
from app.settings import get_settings
from worker.state import STATE

logger = logging.getLogger(__name__)


def create_celery() -> Celery:
    """A worker app configured from settings: late acks, prefetch of one, one training at a time."""
    settings = get_settings()
    app = Celery("sgjobs-worker", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    if is_embedded_broker(settings.broker_url):
        # kombu hands every SQLAlchemy transport option to create_engine, which refuses a
        # polling_interval; the transport's own default (1 s) is the one place left to set it.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = settings.broker_poll_seconds
    return app


celery_app = create_celery()


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    # Imported here so that `celery -A worker.celery_app` does not pay for it at import time.
    from app.jobs import lifecycle
    from app.webhooks import sender as webhook_sender
    from worker.standby import SLOT
    from worker.sweeper import run_forever

    STATE.name = getattr(sender, "hostname", None)
    threading.Thread(target=run_forever, name="sgjobs-sweeper", daemon=True).start()
    # Webhook messages of the jobs that end here (and of any other: every sender takes any message).
    webhook_sender.start(get_settings(), note=lifecycle.note, stop=STATE.stopping)
    # The first job's training process, started now so that it waits imported (`worker.standby`).
    SLOT.fill(get_settings())


@signals.worker_shutting_down.connect
def _hand_back_on_shutdown(sig: str = "", how: str = "", **_: Any) -> None:
    # SIGTERM (a deploy, a spot reclaim) or SIGINT: the running attempt is handed back at once for
    # another worker to resume, instead of the warm shutdown waiting hours for the training to end.
    logger.info("worker shutting down (%s, %s): handing the running job back", sig, how)
    STATE.stopping.set()


@signals.worker_shutdown.connect
def _say_goodbye(**_: Any) -> None:
    from app.db import session_scope
    from app.workers import service as workers
    from worker.standby import SLOT

    SLOT.close()  # the spare would also get SIGTERM when this process exits (`die_with_parent`)
    if STATE.name is None:
        return
    try:
        with session_scope(get_settings().database_url) as session:
            workers.gone(session, name=STATE.name)
    except Exception as exc:
        logger.warning("could not remove this worker's row: %s", exc)
