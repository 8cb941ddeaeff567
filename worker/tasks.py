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
from worker.standby import SLOT
from worker.state import STATE

logger = logging.getLogger(__name__)


@celery_app.task(name=TRAIN_TASK, bind=True)
def train_job(self: object, job_id: str) -> str:
    """Claim a queued job as a new attempt and train it in a child process; a duplicate delivery,
    or one for a job that is not queued, does nothing."""
    settings = get_settings()
    if STATE.stopping.is_set():
        # Warm shutdown delivers no new work, but a message taken just before it must not start:
        # marked unsent, the next sweep of any worker sends it again.
        logger.info("worker stopping; leaving job %s for another worker", job_id)
        with session_scope(settings.database_url) as session:
            lifecycle.unsend(session, job_id=job_id)
        return "skipped"
    job_dir = settings.jobs_dir / job_id
    hostname = getattr(getattr(self, "request", None), "hostname", None) or socket.gethostname()
    with session_scope(settings.database_url) as session:
        attempt = lifecycle.claim(
            session, job_id=job_id, worker=hostname, job_dir=job_dir, lease_seconds=settings.lease_seconds
        )
    if attempt is None:
        logger.info("job %s is not queued any more (cancelled, or a duplicate delivery); skipping", job_id)
        return "skipped"
    STATE.busy(job_id)
    try:
        return run_training_process(
            settings, job_id=job_id, attempt=attempt, job_dir=job_dir, shutdown=STATE.stopping, standby=SLOT
        )
    finally:
        STATE.idle()
        if not STATE.stopping.is_set():
            SLOT.fill(settings)  # for the next job, now that no training needs the CPU
