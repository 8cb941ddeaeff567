"""The job lifecycle the worker drives: claim, heartbeats, progress, metrics, events, the outcome.

Functions take a session and keyword arguments and never commit: the task boundary does. Every state
change is a conditional UPDATE on the current status, so a duplicate Celery delivery, a cancel racing
a claim, or a sweeper racing a finishing worker cannot move a job twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, func, insert, select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs.models import FINISHED_STATUSES, FailureReason, Job, JobEvent, JobStatus, Metric
from app.ml.types import MetricPoint


def _changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed: how a conditional state change tells whether it won."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def cancel_queued(session: Session, *, job_id: str) -> bool:
    """queued -> cancelled; False when the job is not queued (any more)."""
    now = utcnow()
    cancelled = _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested_at=now, finished_at=now),
    )
    if cancelled:
        add_event(session, job_id=job_id, kind="state", message="cancelled before it started")
    return bool(cancelled)


def request_stop(session: Session, *, job_id: str) -> bool:
    """Flag a running job for its training to stop (read within one batch); False if already flagged."""
    requested = _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested_at.is_(None))
        .values(cancel_requested_at=utcnow()),
    )
    if requested:
        add_event(session, job_id=job_id, kind="state", message="cancel requested")
    return bool(requested)


def mark_enqueued(session: Session, *, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim(session: Session, *, job_id: str, worker: str, job_dir: Path) -> bool:
    """queued -> running. False when someone else has it or it was cancelled meanwhile."""
    now = utcnow()
    claimed = _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running, started_at=now, heartbeat_at=now, worker=worker, job_dir=str(job_dir)
        ),
    )
    if claimed:
        add_event(session, job_id=job_id, kind="state", message=f"running on {worker}")
    return bool(claimed)


def heartbeat(session: Session, *, job_id: str) -> bool:
    """Refresh the heartbeat of a running job; True when a cancel has been requested."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.running).values(heartbeat_at=utcnow())
    )
    return cancel_requested(session, job_id=job_id)


def activity_marker(session: Session, *, job_id: str) -> tuple[object, ...]:
    """Changes whenever a job makes progress (a batch, a metric point, an event)."""
    row = session.execute(select(Job.epoch, Job.batch).where(Job.id == job_id)).one_or_none()
    last_metric = session.scalar(select(func.max(Metric.id)).where(Metric.job_id == job_id))
    last_event = session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id))
    return (*(row or (None, None)), last_metric, last_event)


def cancel_requested(session: Session, *, job_id: str) -> bool:
    value = session.execute(select(Job.cancel_requested_at).where(Job.id == job_id)).scalar_one_or_none()
    return value is not None


def set_classes(session: Session, *, job_id: str, classes: Sequence[str]) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(classes=list(classes)))


def set_started_from(session: Session, *, job_id: str, started_from: dict[str, Any]) -> None:
    """Record what the training loaded (`app.jobs.schemas.StartedFrom`)."""
    session.execute(update(Job).where(Job.id == job_id).values(started_from=started_from))


def record_progress(
    session: Session,
    *,
    job_id: str,
    epoch: int,
    batch: int,
    batches_per_epoch: int,
) -> None:
    values: dict[str, Any] = {
        "epoch": epoch,
        "batch": batch,
        "batches_per_epoch": batches_per_epoch,
        "heartbeat_at": utcnow(),
    }
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running).values(**values))
    # The ETA counts from the first reported batch, not from the claim (dataset and model set-up).
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.training_started_at.is_(None))
        .values(training_started_at=utcnow())
    )


def record_best(session: Session, *, job_id: str, value: float | None) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(best_metric_value=value))


def add_metrics(session: Session, *, job_id: str, points: Sequence[MetricPoint]) -> None:
    """One multi-row INSERT for a batch of points."""
    if not points:
        return
    now = utcnow()
    session.execute(
        insert(Metric),
        [
            {
                "job_id": job_id,
                "name": p.name,
                "epoch": p.epoch,
                "step": p.step,
                "value": p.value,
                "time": p.time or now,
            }
            for p in points
        ],
    )


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    kind: str = "log",
    level: str = "info",
    data: dict[str, Any] | None = None,
    time: datetime | None = None,
) -> None:
    """Append an event; `time` is when it happened if that was earlier than now (buffered writers)."""
    session.add(
        JobEvent(job_id=job_id, kind=kind, level=level, message=message, data=data, time=time or utcnow())
    )


def finish(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    reason: FailureReason | None = None,
    message: str | None = None,
    artifacts: dict[str, str] | None = None,
    best_value: float | None = None,
    device: str | None = None,
) -> bool:
    """running -> succeeded | failed | cancelled, once."""
    assert status in FINISHED_STATUSES
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "error_reason": reason,
        "error_message": message,
    }
    if artifacts is not None:
        values["artifacts"] = artifacts
    if best_value is not None:
        values["best_metric_value"] = best_value
    if device is not None:
        values["device"] = device
    done = _changed(
        session,
        update(Job).where(Job.id == job_id, Job.status == JobStatus.running).values(**values),
    )
    if done:
        text = status.value if message is None else f"{status.value}: {message}"
        add_event(
            session,
            job_id=job_id,
            kind="state",
            level="error" if status == JobStatus.failed else "info",
            message=text,
        )
    return bool(done)


def fail_stale(session: Session, *, now: datetime, stale_after: timedelta) -> list[str]:
    """Fail running jobs whose worker stopped sending heartbeats (it died or lost the machine)."""
    cutoff = now - stale_after
    ids = list(
        session.scalars(
            select(Job.id).where(Job.status == JobStatus.running, Job.heartbeat_at < cutoff)
        ).all()
    )
    failed = []
    for job_id in ids:
        if finish(
            session,
            job_id=job_id,
            status=JobStatus.failed,
            reason=FailureReason.worker_lost,
            message=f"the worker stopped reporting for over {int(stale_after.total_seconds())} s "
            "(it was stopped or its machine went away); submit the job again",
        ):
            failed.append(job_id)
    return failed


def requeue_candidates(session: Session, *, now: datetime, older_than: timedelta) -> list[str]:
    """Queued jobs never sent, or sent long ago: their broker message may be lost."""
    cutoff = now - older_than
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.queued)
            .where(
                (Job.enqueued_at.is_(None) & (Job.created_at < now - timedelta(seconds=5)))
                | (Job.enqueued_at < cutoff)
            )
            .order_by(Job.created_at)
        ).all()
    )
