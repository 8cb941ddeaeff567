"""Sending a queued job's message, coordinated through the database.

The broker is not the source of truth: a message can be lost (the broker restarted without its
data, the send failed) or sent twice. The database decides who sends: `lifecycle.claim_send` is a
conditional UPDATE, committed before the message goes out, so of several workers' sweepers (and
the API) one sends, and a job's queue holds one message per send window rather than one per sweeper.
A duplicate message is harmless anyway: the claim of a job that is not queued changes nothing.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import queue
from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.models import Job
from app.settings import Settings

logger = logging.getLogger(__name__)


def send(settings: Settings, *, job_id: str, resend_after: float | None = None) -> bool:
    """Send a queued job's message if it is due (see `lifecycle.claim_send`); True when sent."""
    with session_scope(settings.database_url) as session:
        if not lifecycle.claim_send(session, job_id=job_id, resend_after=resend_after):
            return False
        pool, gpus = job_route(session, job_id=job_id)
    try:
        queue.send_train_job(settings, job_id, pool=pool, gpus=gpus)
    except Exception as exc:
        logger.warning("could not send job %s: %s", job_id, exc)
        with session_scope(settings.database_url) as session:
            lifecycle.unsend(session, job_id=job_id)
            lifecycle.add_event(
                session, job_id=job_id, level="warning", message=f"broker unreachable, will retry: {exc}"
            )
        return False
    return True


def job_route(session: Session, *, job_id: str) -> tuple[str | None, int]:
    """The worker pool a job asked for (its spec's `queue`; None: the default pool) and its GPUs."""
    spec = session.scalar(select(Job.spec).where(Job.id == job_id))
    return lifecycle.spec_pool(spec), lifecycle.spec_gpus(spec)
