"""The job lifecycle the worker drives: claim, heartbeats, progress, metrics, events, the outcome.

Functions take a session and keyword arguments and never commit: the task boundary does. Every state
change is a conditional UPDATE on the current status, so a duplicate Celery delivery, a cancel racing
a claim, or a sweeper racing a finishing worker cannot move a job twice.

Attempts and leases: each claim starts a new attempt (`jobs.attempt` + 1) holding a lease that ends
at a database time (`app.db.db_now`). The attempt renews it with every write (`renew`), and every
write an attempt makes runs in a transaction that first renews it: an UPDATE conditional on
`status = 'running' AND attempt = <its number>`, which also locks the row, so a sweeper moving the
job on (`expire_leases`) and a late write of the old attempt are serialized, and the loser changes
nothing. A lost attempt (`lose_attempt`) is queued again and resumed from its last checkpoint, up to
the job's `max_restarts`.

Every move to a final status (`finish`, `cancel_queued`) counts it in `jobs.finishes` and, when the
job's spec names a webhook, adds the message about it to the outbox in the same transaction: the
message exists exactly when the status change does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Row, Update, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.db import UTCDateTime, changed, db_now, utcnow
from app.jobs.models import FINISHED_STATUSES, JOBS, METRICS, FailureReason, Job, JobEvent, JobStatus, Metric
from app.ml.types import MetricPoint, greater_is_better
from app.webhooks import outbox
from app.webhooks.payload import snapshot

# What a move to a final status returns, for its webhook message.
_ENDED = (
    Job.id,
    Job.finishes,
    Job.spec,
    Job.name,
    Job.status,
    Job.attempt,
    Job.best_metric_name,
    Job.best_metric_value,
    Job.error_reason,
    Job.error_message,
    Job.finished_at,
)


def _end(session: Session, statement: Update) -> bool:
    """Run a conditional UPDATE to a final status; when it changed the job, count the end and queue
    the webhook message about it (if the spec names one). False when it changed nothing."""
    row: Row[Any] | None = session.execute(
        statement.values(finishes=Job.finishes + 1).returning(*_ENDED)
    ).one_or_none()
    if row is None:
        return False
    url = ((row.spec or {}).get("webhook") or {}).get("url")
    if url:
        outbox.add(
            session,
            job_id=row.id,
            sequence=row.finishes,
            url=url,
            payload=snapshot(
                job_id=row.id,
                name=row.name,
                status=row.status,
                attempt=row.attempt,
                best_metric_name=row.best_metric_name,
                best_metric_value=row.best_metric_value,
                error_reason=row.error_reason,
                error_message=row.error_message,
                finished_at=row.finished_at,
            ),
        )
    return True


# The kind of the event `supersede_from_epoch` writes (live streams send it as `superseded`).
SUPERSEDED_KIND = "superseded"


def cancel_queued(session: Session, *, job_id: str) -> bool:
    """queued -> cancelled; False when the job is not queued (any more)."""
    now = utcnow()
    cancelled = _end(
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
    requested = changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested_at.is_(None))
        .values(cancel_requested_at=utcnow()),
    )
    if requested:
        add_event(session, job_id=job_id, kind="state", message="cancel requested")
    return bool(requested)


def claim_send(session: Session, *, job_id: str, resend_after: float | None = None) -> bool:
    """Take the right to send a queued job's message: never sent (`enqueued_at` NULL), or, with
    `resend_after`, last sent longer ago than that. One conditional UPDATE, so of several sweepers
    only one sends; the caller commits before sending and calls `unsend` if sending fails."""
    due: ColumnElement[bool] = Job.enqueued_at.is_(None)
    if resend_after is not None:
        due = due | (Job.enqueued_at < db_now(-resend_after))
    return bool(
        changed(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued, due)
            .values(enqueued_at=db_now()),
        )
    )


def unsend(session: Session, *, job_id: str) -> None:
    """The message could not be sent: leave the job for the next sweep."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued).values(enqueued_at=None)
    )


def send_candidates(session: Session, *, resend_after: float | None, pool: str | None = None) -> list[str]:
    """Queued jobs whose message is missing: never sent (older than a few seconds, so the API's own
    send after its commit goes first), or, with `resend_after` (the asking worker is idle), sent
    longer ago than that and of the asking worker's `pool`: an idle worker proves only its own
    pool's queue empty (another pool's job may wait, its message in place, for a worker of that pool)."""
    never_sent = Job.enqueued_at.is_(None) & (
        (Job.created_at < db_now(-5)) | (Job.attempt > 0) | (Job.restarts > 0)
    )
    due: ColumnElement[bool] = never_sent
    if resend_after is not None:
        due = due | (Job.enqueued_at < db_now(-resend_after))
    rows = session.execute(
        select(Job.id, Job.enqueued_at, Job.spec)
        .where(Job.status == JobStatus.queued, due)
        .order_by(Job.created_at)
    ).all()
    return [job_id for job_id, sent, spec in rows if sent is None or spec_pool(spec) == (pool or None)]


def spec_pool(spec: dict[str, Any] | None) -> str | None:
    """The worker pool a stored spec asks for (`queue`); None: the default pool."""
    pool = (spec or {}).get("queue")
    return pool if isinstance(pool, str) and pool else None


def spec_gpus(spec: dict[str, Any] | None) -> int:
    """The GPUs a stored spec asks for (`gpus`; 1 for specs stored before the field existed)."""
    gpus = (spec or {}).get("gpus")
    return gpus if isinstance(gpus, int) and gpus > 1 else 1


def claim(session: Session, *, job_id: str, worker: str, job_dir: Path, lease_seconds: float) -> int | None:
    """queued -> running as a new attempt holding a lease; returns its number, None when someone
    else has the job or it was cancelled meanwhile."""
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running,
            attempt=Job.attempt + 1,
            lease_expires_at=db_now(lease_seconds),
            heartbeat_at=db_now(),
            started_at=func.coalesce(Job.started_at, db_now()),
            worker=worker,
            job_dir=str(job_dir),
        )
        .returning(Job.attempt)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    add_event(
        session,
        job_id=job_id,
        kind="state",
        message=f"attempt {attempt} running on {worker}",
        data={"attempt": attempt, "worker": worker},
    )
    return int(attempt)


def renew(session: Session, *, job_id: str, attempt: int, lease_seconds: float) -> bool:
    """Extend the lease of a running attempt; False when the job has moved on (another attempt,
    finished, handed back). Run first in every transaction that writes for an attempt: the UPDATE
    locks the row, so nothing that moves the job on can interleave with the writes after it."""
    return report(session, job_id=job_id, attempt=attempt, lease_seconds=lease_seconds) is not None


class Progress(NamedTuple):
    """Where a training is: the epoch and batch it last finished."""

    epoch: int
    batch: int
    batches_per_epoch: int


def report(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    lease_seconds: float,
    progress: Progress | None = None,
    best: float | None = None,
    best_changed: bool = False,
) -> bool | None:
    """Renew a running attempt's lease, record its progress (and best value, when `best_changed`),
    and read the cancel flag, in one UPDATE ... RETURNING: the first statement of every transaction
    the attempt writes (the fence `renew` describes); only the INSERTs of points and events follow it.

    None when the job has moved on (nothing changed); else whether a cancel was requested.
    A training process reports twice a second on the cores it trains on: one statement built once
    (per lease length and shape) in place of five built per call took a reporter's flush from 5.1 to
    1.1 ms of CPU on SQLite and from 8.1 to 2.4 ms on PostgreSQL (BENCHMARKS, training overhead).
    """
    statement = _report_statement(lease_seconds, progress is not None, best_changed)
    params: dict[str, Any] = {"r_job_id": job_id, "r_attempt": attempt}
    if progress is not None:
        params |= {
            "r_epoch": progress.epoch,
            "r_batch": progress.batch,
            "r_batches_per_epoch": progress.batches_per_epoch,
            "r_now": utcnow(),
        }
    if best_changed:
        params["r_best"] = best
    row = session.execute(statement, params).one_or_none()
    return None if row is None else row[0] is not None


@lru_cache(maxsize=64)
def _report_statement(lease_seconds: float, progress: bool, best: bool) -> Update:
    values: dict[str, Any] = {"lease_expires_at": db_now(lease_seconds), "heartbeat_at": db_now()}
    if progress:
        values |= {
            "epoch": bindparam("r_epoch"),
            "batch": bindparam("r_batch"),
            "batches_per_epoch": bindparam("r_batches_per_epoch"),
            # The ETA counts from the first reported batch, not from the claim (dataset and model set-up).
            "training_started_at": func.coalesce(
                JOBS.c.training_started_at, bindparam("r_now", type_=UTCDateTime())
            ),
        }
    if best:
        values["best_metric_value"] = bindparam("r_best")
    return (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("r_job_id"),
            JOBS.c.status == JobStatus.running,
            JOBS.c.attempt == bindparam("r_attempt"),
        )
        .values(values)
        .returning(JOBS.c.cancel_requested_at)
    )


def heartbeat(session: Session, *, job_id: str, attempt: int, lease_seconds: float) -> tuple[bool, bool]:
    """The supervisor's renewal: (still holds the lease, cancel requested)."""
    cancel = report(session, job_id=job_id, attempt=attempt, lease_seconds=lease_seconds)
    return cancel is not None, bool(cancel)


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


def set_artifacts(session: Session, *, job_id: str, artifacts: dict[str, str]) -> None:
    """Record the files a finished job left (`app.jobs.files.collect_artifacts`)."""
    session.execute(update(Job).where(Job.id == job_id).values(artifacts=artifacts))


def set_started_from(session: Session, *, job_id: str, started_from: dict[str, Any]) -> None:
    """Record what the training loaded (`app.jobs.schemas.StartedFrom`)."""
    session.execute(update(Job).where(Job.id == job_id).values(started_from=started_from))


def add_metrics(session: Session, *, job_id: str, points: Sequence[MetricPoint]) -> None:
    """One multi-row INSERT for a batch of points (Core, not the ORM's bulk insert: the training
    process writes these twice a second, and the ORM's per-call set-up costs more than the rows)."""
    if not points:
        return
    now = utcnow()
    session.execute(
        insert(METRICS),
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
    attempt: int | None = None,
) -> bool:
    """running -> succeeded | failed | cancelled, once; with `attempt`, only if that attempt still
    holds the job."""
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
    statement = update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
    if attempt is not None:
        statement = statement.where(Job.attempt == attempt)
    values["lease_expires_at"] = None
    done = _end(session, statement.values(**values))
    if done:
        text = status.value if message is None else f"{status.value}: {message}"
        add_event(
            session,
            job_id=job_id,
            kind="state",
            level="error" if status == JobStatus.failed else "info",
            message=text,
        )
    return done


def status_of_attempt(session: Session, *, job_id: str, attempt: int) -> str | None:
    """The job's status while `attempt` is still its latest attempt; None once another took over."""
    return session.scalar(select(Job.status).where(Job.id == job_id, Job.attempt == attempt))


def lose_attempt(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    why: str,
    reason: FailureReason = FailureReason.worker_lost,
) -> JobStatus | None:
    """A running attempt is lost (`why`): queue the job again to resume from its last checkpoint
    while restarts remain, else fail it with `reason` (cancelled instead if a cancel was pending).
    Returns the new status, None when that attempt did not hold the job any more."""
    job = session.execute(
        select(Job.worker, Job.restarts, Job.max_restarts, Job.cancel_requested_at).where(
            Job.id == job_id, Job.status == JobStatus.running, Job.attempt == attempt
        )
    ).one_or_none()
    if job is None:
        return None
    worker, restarts, max_restarts, cancel_at = job
    data = {"attempt": attempt, "worker": worker, "restarts": restarts, "max_restarts": max_restarts}
    if cancel_at is not None:
        done = finish(
            session,
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.cancelled,
            message=f"attempt {attempt} on {worker} was lost ({why}) while cancelling",
        )
        return JobStatus.cancelled if done else None
    if restarts < max_restarts:
        requeued = changed(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.attempt == attempt)
            .values(
                status=JobStatus.queued, restarts=Job.restarts + 1, lease_expires_at=None, enqueued_at=None
            ),
        )
        if not requeued:
            return None
        add_event(
            session,
            job_id=job_id,
            kind="state",
            level="warning",
            message=f"attempt {attempt} on {worker} lost: {why}; queued to resume from its last checkpoint "
            f"(restart {restarts + 1} of {max_restarts})",
            data={**data, "restarts": restarts + 1},
        )
        return JobStatus.queued
    done = finish(
        session,
        job_id=job_id,
        attempt=attempt,
        status=JobStatus.failed,
        reason=reason,
        message=f"attempt {attempt} on {worker} was lost ({why}) and the job was already restarted "
        f"{restarts} time(s) (max_restarts {max_restarts}); each attempt is in the job's events",
    )
    return JobStatus.failed if done else None


def expire_leases(session: Session) -> dict[str, JobStatus]:
    """Running attempts whose lease ended (database clock) are lost; returns job id -> new status.

    Rows another transaction has locked are skipped (PostgreSQL), not waited for: a process frozen
    mid-write would otherwise stall every sweeper, and so every other job's expiry, until it woke.
    Its session ends after `db_lock_idle_seconds` (`app.db.bound_locked_idle`), and a later pass
    expires its job.
    """
    expired = session.execute(
        select(Job.id, Job.attempt, Job.lease_expires_at)
        .where(
            Job.status == JobStatus.running,
            Job.lease_expires_at.is_(None) | (Job.lease_expires_at < db_now()),
        )
        .with_for_update(skip_locked=True)
    ).all()
    moved = {}
    for job_id, attempt, lease in expired:
        when = f"at {lease:%H:%M:%S} UTC" if lease is not None else ""
        status = lose_attempt(
            session,
            job_id=job_id,
            attempt=attempt,
            why=f"its lease expired {when} (the worker was killed, paused or cut off)".replace("  ", " "),
        )
        if status is not None:
            moved[job_id] = status
    return moved


def hand_back(session: Session, *, job_id: str, attempt: int, why: str) -> bool:
    """A worker that stops (a deploy, a spot reclaim) gives its running attempt back: queued again
    at once, to resume elsewhere; not counted as a restart."""
    worker = session.scalar(
        select(Job.worker).where(Job.id == job_id, Job.status == JobStatus.running, Job.attempt == attempt)
    )
    handed = changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.attempt == attempt)
        .values(status=JobStatus.queued, lease_expires_at=None, enqueued_at=None),
    )
    if handed:
        add_event(
            session,
            job_id=job_id,
            kind="state",
            message=f"attempt {attempt} handed back by {worker} ({why}); "
            "queued to resume from its last checkpoint",
            data={"attempt": attempt, "worker": worker, "handed_back": True},
        )
    return bool(handed)


def supersede_from_epoch(session: Session, *, job_id: str, epoch: int, metric_to_watch: str) -> int:
    """Before an attempt resumes at `epoch`, delete the points the lost attempt wrote for that
    epoch and later (per-batch points of the partial epoch, and per-epoch points written before
    its checkpoint was): every series then ends with one point per epoch. The best metric is
    recomputed from what is left. Returns the points deleted."""
    deleted = changed(session, delete(Metric).where(Metric.job_id == job_id, Metric.epoch >= epoch))
    if deleted:
        # Live streams (`app.jobs.stream`) sent those points already: this tells them to drop them.
        add_event(
            session,
            job_id=job_id,
            kind=SUPERSEDED_KIND,
            message=f"{deleted} metric points of epoch {epoch + 1} and later superseded by this attempt",
            data={"superseded_from_epoch": epoch, "deleted": deleted},
        )
    name = f"Valid_{metric_to_watch}"
    best = func.max(Metric.value) if greater_is_better(metric_to_watch) else func.min(Metric.value)
    value = session.scalar(select(best).where(Metric.job_id == job_id, Metric.name == name))
    session.execute(update(Job).where(Job.id == job_id).values(best_metric_value=value))
    return deleted


def note(session: Session, job_id: str, message: str, level: str, data: dict[str, Any]) -> None:
    """An event about the job from another area (its webhook messages), if the job still exists
    (a finished job can be deleted before its message is sent). The row is locked first, so a
    concurrent delete waits instead of leaving an event without its job."""
    if session.scalar(select(Job.id).where(Job.id == job_id).with_for_update()) is not None:
        add_event(session, job_id=job_id, message=message, level=level, data=data)
