"""Retention: how long finished jobs keep their per-batch metric points.

Every batch of a training writes a point per loss component and one for the learning rate, so
per-batch series are most of the metrics table; once a job has been finished for a while its
per-epoch series (losses, mAP, ...) are what people look at. The worker's sweeper calls
`prune_batch_metrics` with `retention_period(settings)`.

Functions take a session and keyword arguments and never commit: the caller does.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import FINISHED_STATUSES, Job, Metric
from app.ml.types import BATCH_PREFIX
from app.settings import Settings

# Rows per DELETE statement: each statement stays short, so a large table is never held for long.
BATCH_ROWS = 10_000


def retention_period(settings: Settings) -> timedelta | None:
    """How long finished jobs keep per-batch points (SGJOBS_BATCH_METRICS_RETENTION_DAYS); None: forever."""
    days = settings.batch_metrics_retention_days
    return None if days is None else timedelta(days=days)


def prune_batch_metrics(
    session: Session,
    *,
    older_than: timedelta,
    batch_rows: int = BATCH_ROWS,
    max_rows: int | None = None,
) -> int:
    """Delete the per-batch metric points (names starting with `BATCH_PREFIX`) of jobs that finished
    more than `older_than` ago; per-epoch points stay. Returns the number of rows deleted.

    Deletes `batch_rows` rows per statement. `max_rows` stops after about that many (whole
    statements), so a caller can commit between rounds and never hold one long write transaction
    (SQLite blocks every other writer, a running training's metrics included, until it commits)::

        while prune_batch_metrics(session, older_than=period, max_rows=100_000):
            session.commit()
    """
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative (got {older_than})")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1 (got {batch_rows})")
    cutoff = utcnow() - older_than
    old_jobs = select(Job.id).where(Job.status.in_(FINISHED_STATUSES), Job.finished_at < cutoff)
    # autoescape: "_" is a LIKE wildcard, and "Batch" followed by any character is not the prefix.
    per_batch = Metric.name.startswith(BATCH_PREFIX, autoescape=True)
    deleted = 0
    while max_rows is None or deleted < max_rows:
        chunk = select(Metric.id).where(Metric.job_id.in_(old_jobs), per_batch).limit(batch_rows)
        result = cast(
            CursorResult[Any],
            session.execute(
                delete(Metric)
                .where(Metric.id.in_(chunk.scalar_subquery()))
                .execution_options(synchronize_session=False)
            ),
        )
        deleted += result.rowcount
        if result.rowcount < batch_rows:
            break
    return deleted
