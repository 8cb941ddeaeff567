"""Job queries and state changes. Functions take a session and keyword arguments and never commit:
the request or the task boundary does.

Every state change is a conditional UPDATE on the current status, so a duplicate Celery delivery, a
cancel racing a claim, or a reaper racing a finishing worker cannot move a job twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, func, insert, select, update
from sqlalchemy.orm import Session

from app.datasets.formats import check_layout
from app.datasets.service import resolve_spec
from app.db import utcnow
from app.errors import Conflict, DatasetError, InvalidInput, NotFound
from app.jobs.models import FINISHED_STATUSES, FailureReason, Job, JobEvent, JobStatus, Metric
from app.jobs.schemas import BestMetric, JobError, JobOut, JobSpec, Progress
from app.ml.types import MetricPoint
from app.settings import Settings


def _changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed: how a conditional state change tells whether it won."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def _field_error(loc: Sequence[str | int], message: str) -> InvalidInput:
    return InvalidInput(message, details=[{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


def resolve_dataset_root(settings: Settings, relative: str) -> Path:
    """The dataset root inside the datasets directory; symlinks may not lead out of it."""
    base = settings.datasets_root.resolve()
    root = (base / relative).resolve()
    if root != base and base not in root.parents:
        raise _field_error(["dataset", "path"], "dataset path leads outside the datasets directory")
    if not root.is_dir():
        raise _field_error(
            ["dataset", "path"], f"dataset directory {relative!r} does not exist in the datasets directory"
        )
    return root


def checkpoint_for_init(job: Job) -> Path | None:
    """The checkpoint another job may start from: its best one, else its latest."""
    artifacts = job.artifacts or {}
    for key in ("ckpt_best", "ckpt_latest"):
        if key in artifacts and Path(artifacts[key]).is_file():
            return Path(artifacts[key])
    return None


def create_job(session: Session, *, spec: JobSpec, settings: Settings) -> Job:
    """Validate what the spec points at (dataset layout, init job) and insert a queued job."""
    resolved = resolve_spec(session, settings=settings, spec=spec.dataset, resolve_path=resolve_dataset_root)
    try:
        check_layout(resolved.root, resolved.options)
    except DatasetError as exc:
        raise _field_error(["dataset"], exc.message) from exc
    if spec.dataset.id is not None and spec.dataset.format is None:
        # The stored spec names the format, so the job says what it trained on.
        spec = spec.model_copy(
            update={"dataset": spec.dataset.model_copy(update={"format": resolved.options.format})}
        )
    if spec.init_from is not None:
        source = session.get(Job, spec.init_from.job_id)
        if source is None:
            raise _field_error(["init_from", "job_id"], f"job {spec.init_from.job_id!r} does not exist")
        if source.model != spec.model:
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} trained {source.model}; a {spec.model} cannot start from its checkpoint",
            )
        if checkpoint_for_init(source) is None:
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} has no checkpoint to start from (status {source.status})",
            )
    job = Job(
        name=spec.name,
        status=JobStatus.queued,
        model=spec.model,
        spec=spec.model_dump(mode="json"),
        max_epochs=spec.training.max_epochs,
        best_metric_name=spec.training.metric_to_watch,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, kind="state", message="queued")
    return job


def get_job(session: Session, *, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session, *, status: JobStatus | None, limit: int, offset: int
) -> tuple[Sequence[Job], int]:
    """Newest first."""
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if status is not None:
        query = query.where(Job.status == status)
        count = count.where(Job.status == status)
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return rows, session.scalar(count) or 0


def request_cancel(session: Session, *, job_id: str) -> Job:
    """Cancel a queued job at once, or ask a running one to stop. Idempotent; 409 once finished."""
    job = get_job(session, job_id=job_id)
    now = utcnow()
    cancelled = _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested_at=now, finished_at=now),
    )
    if cancelled:
        add_event(session, job_id=job_id, kind="state", message="cancelled before it started")
    else:
        requested = _changed(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now),
        )
        if requested:
            add_event(session, job_id=job_id, kind="state", message="cancel requested")
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(f"job {job_id!r} already {job.status}; there is nothing to cancel")
    return job


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


def list_metrics(
    session: Session, *, job_id: str, names: Sequence[str], cursor: int | None, limit: int
) -> Sequence[Metric]:
    get_job(session, job_id=job_id)
    query = select(Metric).where(Metric.job_id == job_id)
    if names:
        query = query.where(Metric.name.in_(names))
    if cursor is not None:
        query = query.where(Metric.id > cursor)
    return session.scalars(query.order_by(Metric.id).limit(limit)).all()


def list_events(session: Session, *, job_id: str, cursor: int | None, limit: int) -> Sequence[JobEvent]:
    get_job(session, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if cursor is not None:
        query = query.where(JobEvent.id > cursor)
    return session.scalars(query.order_by(JobEvent.id).limit(limit)).all()


def _progress(job: Job, now: datetime) -> Progress:
    epoch, batch, per_epoch = job.epoch, job.batch, job.batches_per_epoch
    percent = 0.0
    eta: float | None = None
    if job.status == JobStatus.succeeded:
        percent = 100.0
    elif epoch is not None and per_epoch:
        done = epoch * per_epoch + (batch or 0)
        fraction = min(1.0, done / (job.max_epochs * per_epoch))
        percent = round(100.0 * fraction, 2)
        if job.status == JobStatus.running and job.training_started_at is not None and fraction > 0:
            elapsed = (now - job.training_started_at).total_seconds()
            eta = round(elapsed * (1 - fraction) / fraction, 1)
    return Progress(
        epoch=epoch,
        max_epochs=job.max_epochs,
        batch=batch,
        batches_per_epoch=per_epoch,
        percent=percent,
        eta_seconds=eta,
    )


def to_out(job: Job) -> JobOut:
    """The API's view of a job."""
    return JobOut(
        id=job.id,
        name=job.name,
        status=job.status,
        model=job.model,
        classes=job.classes,
        progress=_progress(job, utcnow()),
        best_metric=BestMetric(name=job.best_metric_name, value=job.best_metric_value),
        error=JobError(reason=job.error_reason, message=job.error_message or "")
        if job.error_reason
        else None,
        cancel_requested=job.cancel_requested_at is not None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        device=job.device,
        job_dir=job.job_dir,
        artifacts=job.artifacts or {},
        spec=job.spec,
    )
