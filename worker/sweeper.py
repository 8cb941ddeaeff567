"""Keeps the promise that an accepted job is never lost and never stuck.

Runs in each worker: fails running jobs whose worker stopped sending heartbeats, and sends again
queued jobs whose broker message may be lost (never sent because the broker was down, or sent long
ago). A duplicate message is harmless: the claim is a conditional update.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from app import queue
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 15.0


def sweep_once(settings: Settings) -> tuple[list[str], list[str]]:
    """One pass; returns (failed job ids, re-sent job ids)."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        failed = lifecycle.fail_stale(
            session, now=now, stale_after=timedelta(seconds=settings.stale_after_seconds)
        )
        candidates = lifecycle.requeue_candidates(
            session, now=now, older_than=timedelta(seconds=settings.requeue_after_seconds)
        )
    resent = []
    for job_id in candidates:
        try:
            queue.send_train_job(settings, job_id)
        except Exception as exc:
            logger.warning("could not re-send job %s: %s", job_id, exc)
            continue
        with session_scope(settings.database_url) as session:
            lifecycle.mark_enqueued(session, job_id=job_id)
        resent.append(job_id)
    if failed or resent:
        logger.info("sweeper: failed stale jobs %s, re-sent queued jobs %s", failed, resent)
    return failed, resent


def run_forever() -> None:
    """Sweep at start-up and then every few seconds, forever (a daemon thread)."""
    settings = get_settings()
    while True:
        try:
            sweep_once(settings)
        except Exception:
            logger.exception("sweeper pass failed")
        time.sleep(SWEEP_INTERVAL_SECONDS)
