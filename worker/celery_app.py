"""The Celery application of the training worker."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals

from app.queue import celery_config
from app.settings import get_settings

logger = logging.getLogger(__name__)


def create_celery() -> Celery:
    """A worker app configured from settings: late acks, prefetch of one, one training at a time."""
    app = Celery("sgjobs-worker", include=["worker.tasks"])
    app.conf.update(celery_config(get_settings()))
    return app


celery_app = create_celery()


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    # Imported here so that `celery -A worker.celery_app` does not pay for it at import time.
    from worker.sweeper import run_forever

    threading.Thread(target=run_forever, name="sgjobs-sweeper", daemon=True).start()
