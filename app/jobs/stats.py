"""What the jobs table says about the service as a whole, for GET /metrics: jobs by status, the queue,
and the running jobs' heartbeats and throughput.

Read in one short transaction at scrape time: the database is the source of truth, so every API
process answers the same. Ages are measured on the database's clock (`db_now`), the clock heartbeats
are written in. Functions take a session and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import db_now
from app.jobs.models import Job, JobEvent, JobStatus, Metric
from app.ml.types import IMAGES_PER_SECOND

# The throughput of a running job: the mean of its latest per-batch points (one batch is noisy).
THROUGHPUT_BATCHES = 10


@dataclass(frozen=True)
class RunningJob:
    """A running job's liveness and speed."""

    job_id: str
    heartbeat_age_seconds: float | None
    images_per_second: float | None


@dataclass(frozen=True)
class JobStats:
    """Jobs by status (every status, zeros included), the queue and the running jobs."""

    by_status: dict[str, int]
    queued: int
    oldest_queued_seconds: float
    running: list[RunningJob]


def _seconds(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


def job_stats(session: Session) -> JobStats:
    """Counts by status, the age of the oldest queued job (0 when none is) and every running job's
    heartbeat age and images/s.

    A queued job's wait counts from when it was last queued: every change to queued (created,
    resumed, an attempt lost or handed back) writes a `state` event in the same transaction, and
    nothing else writes one while a job stays queued.
    """
    now = session.scalar(select(db_now()))
    assert now is not None
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
    by_status = {status.value: counts.get(status.value, 0) for status in JobStatus}

    queued_since = (
        select(func.coalesce(func.max(JobEvent.time), Job.created_at).label("since"))
        .select_from(Job)
        .outerjoin(JobEvent, (JobEvent.job_id == Job.id) & (JobEvent.kind == "state"))
        .where(Job.status == JobStatus.queued)
        .group_by(Job.id, Job.created_at)
        .subquery()
    )
    oldest = session.scalar(select(func.min(queued_since.c.since)))

    running = []
    rows = session.execute(
        select(Job.id, Job.heartbeat_at).where(Job.status == JobStatus.running).order_by(Job.id)
    ).tuples()
    for job_id, heartbeat_at in rows.all():
        latest = (
            select(Metric.value)
            .where(Metric.job_id == job_id, Metric.name == IMAGES_PER_SECOND)
            .order_by(Metric.id.desc())
            .limit(THROUGHPUT_BATCHES)
            .subquery()
        )
        rate = session.scalar(select(func.avg(latest.c.value)))
        running.append(
            RunningJob(
                job_id=job_id,
                heartbeat_age_seconds=_seconds(now, heartbeat_at),
                images_per_second=None if rate is None else float(rate),
            )
        )
    return JobStats(
        by_status=by_status,
        queued=by_status[JobStatus.queued],
        oldest_queued_seconds=_seconds(now, oldest) or 0.0,
        running=running,
    )
