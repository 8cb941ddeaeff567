"""Keeps the promise that an accepted job is never lost and never stuck.

Runs in each worker, every `sweep_interval_seconds`:
- writes the worker's presence (read by `/readyz`);
- ends running attempts whose lease expired (database clock): the job is queued again to resume
  from its last checkpoint, or failed as `worker_lost` after `max_restarts`;
- sends queued jobs whose message is missing: never sent, or, when this worker has been idle for
  `resend_after_seconds` (so the broker has nothing for it), sent longer ago than that. Sends are
  claimed in the database (`app.jobs.dispatch`), so several sweepers do not fill the queue;
- every hour, prunes old per-batch metric points of finished jobs (`batch_metrics_retention_days`),
  and removes the folders of a remote store that no job, dataset or weights row owns any more
  (`app.orphans`: what a delete could not remove when the store failed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from app import orphans
from app.db import session_scope
from app.jobs import dispatch, lifecycle, retention
from app.jobs.models import JobStatus
from app.settings import Settings, get_settings
from app.workers import service as workers
from worker.state import STATE, WorkerState

logger = logging.getLogger(__name__)

# Rows of workers not seen for this long are dropped (they crashed without saying goodbye).
FORGET_WORKERS_AFTER_SECONDS = 24 * 3600.0
# Old per-batch points and the store's orphaned folders are removed this often; points at most this
# many rows per transaction (SQLite holds every other writer, a training's metrics included, while
# one runs).
PRUNE_EVERY_SECONDS = 3600.0
PRUNE_ROWS_PER_COMMIT = 50_000


@dataclass
class SweepResult:
    """What one pass did."""

    moved: dict[str, JobStatus] = field(default_factory=dict)  # expired leases: job -> new status
    sent: list[str] = field(default_factory=list)
    pruned: int = 0  # per-batch metric points deleted


def sweep_once(settings: Settings, state: WorkerState = STATE) -> SweepResult:
    """One pass (see the module docstring)."""
    result = SweepResult()
    with session_scope(settings.database_url) as session:
        if state.name is not None:
            workers.seen(
                session,
                name=state.name,
                job_id=state.job_id,
                queue=settings.worker_queue,
                # What its slot offers one job: POST /jobs checks a spec's `gpus` against it.
                gpus=settings.worker_gpus_per_slot,
            )
            workers.forget_older_than(session, seconds=FORGET_WORKERS_AFTER_SECONDS)
        result.moved = lifecycle.expire_leases(session)
    idle = state.idle_for() >= settings.resend_after_seconds
    with session_scope(settings.database_url) as session:
        candidates = lifecycle.send_candidates(
            session,
            resend_after=settings.resend_after_seconds if idle else None,
            pool=settings.worker_queue,
        )
    for job_id in candidates:
        if dispatch.send(
            settings, job_id=job_id, resend_after=settings.resend_after_seconds if idle else None
        ):
            result.sent.append(job_id)
    if result.moved or result.sent:
        logger.info("sweeper: leases expired %s, sent queued jobs %s", result.moved, result.sent)
    return result


def prune_once(settings: Settings) -> int:
    """Delete the per-batch points of jobs finished longer ago than the retention period."""
    period = retention.retention_period(settings)
    if period is None:
        return 0
    total = 0
    while True:
        with session_scope(settings.database_url) as session:
            deleted = retention.prune_batch_metrics(
                session, older_than=period, max_rows=PRUNE_ROWS_PER_COMMIT
            )
        total += deleted
        if deleted < PRUNE_ROWS_PER_COMMIT:
            break
    if total:
        logger.info("sweeper: deleted %d per-batch metric points of old finished jobs", total)
    return total


def run_forever(state: WorkerState = STATE) -> None:
    """Sweep at start-up and then every `sweep_interval_seconds`, until the worker stops (a thread)."""
    settings = get_settings()
    pruned_at: float | None = None
    while not state.stopping.is_set():
        try:
            sweep_once(settings, state)
            if pruned_at is None or time.monotonic() - pruned_at > PRUNE_EVERY_SECONDS:
                pruned_at = time.monotonic()
                prune_once(settings)
                orphans.remove_orphans(settings)
        except Exception:
            logger.exception("sweeper pass failed")
        state.stopping.wait(settings.sweep_interval_seconds)
