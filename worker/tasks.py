"""Celery task bodies."""

from __future__ import annotations

import logging
import socket

from app.db import session_scope
from app.jobs import lifecycle
from app.queue import TRAIN_TASK
from app.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import run_training_process

logger = logging.getLogger(__name__)


@celery_app.task(name=TRAIN_TASK, bind=True)
def train_job(self: object, job_id: str) -> str:
    """Claim a queued job and train it in a child process; a duplicate delivery does nothing."""
    settings = get_settings()
    job_dir = settings.jobs_dir / job_id
    hostname = getattr(getattr(self, "request", None), "hostname", None) or socket.gethostname()
    with session_scope(settings.database_url) as session:
        claimed = lifecycle.claim(session, job_id=job_id, worker=hostname, job_dir=job_dir)
    if not claimed:
        logger.info("job %s is not queued any more (cancelled, or a duplicate delivery); skipping", job_id)
        return "skipped"
    return run_training_process(settings, job_id=job_id, job_dir=job_dir)
