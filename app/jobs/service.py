"""What the API asks of jobs: create, read, list, cancel, and their metrics and events.

Functions take a session and keyword arguments and never commit: the request does. State changes go
through `app.jobs.lifecycle`, whose updates are conditional on the current status.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.datasets.formats import check_layout
from app.datasets.service import resolve_spec
from app.db import utcnow
from app.errors import Conflict, DatasetError, InvalidInput, NotFound
from app.jobs import files, lifecycle
from app.jobs.models import FINISHED_STATUSES, Job, JobEvent, JobStatus, Metric
from app.jobs.schemas import BestMetric, JobError, JobOut, JobSpec, Progress, StartedFrom
from app.paths import is_inside
from app.settings import Settings
from app.weights import folder
from app.weights import service as weights
from app.weights.models import Weights
from app.weights.service import Inspector, JobCheckpoint


def _field_error(loc: Sequence[str | int], message: str) -> InvalidInput:
    return InvalidInput.field(["body", *loc], message)


def _resolve_init(
    session: Session, *, spec: JobSpec, settings: Settings, inspector: Inspector | None
) -> StartedFrom | None:
    """What `spec.init_from` names, checked now (it exists, it has a checkpoint, it is the same
    architecture); 422 on the field at fault. Published weights are registered if need be."""
    init = spec.init_from
    if init is None:
        return None
    if init.job_id is not None:
        source = session.get(Job, init.job_id)
        if source is None:
            raise _field_error(["init_from", "job_id"], f"job {init.job_id!r} does not exist")
        if source.model != spec.model:
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} trained {source.model}; a {spec.model} cannot start from its checkpoint",
            )
        if files.init_checkpoint(source) is None:
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} has no checkpoint to start from (status {source.status})",
            )
        return StartedFrom(job_id=source.id, name=source.name)
    if init.weights_id is not None:
        found = session.get(Weights, init.weights_id)
        if found is None:
            raise _field_error(["init_from", "weights_id"], f"weights {init.weights_id!r} are not registered")
        loc = ["init_from", "weights_id"]
    else:
        assert init.pretrained is not None
        try:
            found = folder.ensure_published(
                settings,
                model=spec.model,
                dataset=init.pretrained,
                inspector=inspector or weights.model_server_inspector(settings),
            )
        except InvalidInput as exc:
            raise exc.under("body", "init_from") from exc
        loc = ["init_from", "pretrained"]
    if found.model != spec.model:
        raise _field_error(
            loc, f"weights {found.id!r} are a {found.model} checkpoint; a {spec.model} cannot start from them"
        )
    if not weights.weights_file(settings, found.id).is_file():
        raise _field_error(loc, f"the file of weights {found.id!r} is missing from the weights store")
    return StartedFrom(
        weights_id=found.id,
        pretrained=init.pretrained,
        name=found.name,
        sha256=found.sha256,
        num_classes=found.num_classes,
    )


def create_job(
    session: Session, *, spec: JobSpec, settings: Settings, inspector: Inspector | None = None
) -> Job:
    """Validate what the spec points at (dataset layout, init job or weights) and insert a queued job.

    `init_from.pretrained` registers the published file from the weights folder on first use, which
    `inspector` checks (default: the inference process).
    """
    try:
        resolved = resolve_spec(session, settings=settings, spec=spec.dataset)
    except InvalidInput as exc:
        raise exc.under("body", "dataset") from exc
    try:
        check_layout(resolved.root, resolved.options)
    except DatasetError as exc:
        raise _field_error(["dataset"], exc.message) from exc
    if spec.dataset.id is not None and spec.dataset.format is None:
        # The stored spec names the format, so the job says what it trained on.
        spec = spec.model_copy(
            update={"dataset": spec.dataset.model_copy(update={"format": resolved.options.format})}
        )
    if spec.max_restarts > settings.max_restarts_limit:
        raise InvalidInput.field(
            ["body", "max_restarts"],
            f"at most {settings.max_restarts_limit} (SGJOBS_MAX_RESTARTS_LIMIT on this server)",
        )
    started_from = _resolve_init(session, spec=spec, settings=settings, inspector=inspector)
    job = Job(
        name=spec.name,
        status=JobStatus.queued,
        model=spec.model,
        spec=spec.model_dump(mode="json"),
        started_from=started_from.model_dump(mode="json", exclude_none=True) if started_from else None,
        max_epochs=spec.training.max_epochs,
        max_restarts=spec.max_restarts,
        best_metric_name=spec.training.metric_to_watch,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    lifecycle.add_event(session, job_id=job.id, kind="state", message="queued")
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
    if not lifecycle.cancel_queued(session, job_id=job_id):
        lifecycle.request_stop(session, job_id=job_id)
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(f"job {job_id!r} already {job.status}; there is nothing to cancel")
    return job


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
        attempt=job.attempt,
        restarts=job.restarts,
        worker=job.worker,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        device=job.device,
        job_dir=job.job_dir,
        artifacts=job.artifacts or {},
        started_from=StartedFrom.model_validate(job.started_from) if job.started_from else None,
        spec=job.spec,
    )


def jobs_using_dataset(session: Session, *, settings: Settings, dataset_id: str, folder: Path) -> list[str]:
    """Queued or running jobs that read a dataset: by its id, or by a path inside its folder.

    The jobs side of `app.datasets.service.DatasetUsers`.
    """
    users = []
    for job_id, spec in session.execute(
        select(Job.id, Job.spec).where(Job.status.in_((JobStatus.queued, JobStatus.running)))
    ):
        dataset = (spec or {}).get("dataset") or {}
        if dataset.get("id") == dataset_id:
            users.append(job_id)
        elif isinstance(dataset.get("path"), str) and is_inside(
            settings.datasets_dir / dataset["path"], folder
        ):
            users.append(job_id)
    return users


def jobs_using_weights(session: Session, *, weights_id: str) -> list[str]:
    """Queued or running jobs that start from registered weights.

    The jobs side of `app.weights.service.WeightsUsers`.
    """
    return [
        job_id
        for job_id, started_from in session.execute(
            select(Job.id, Job.started_from).where(Job.status.in_((JobStatus.queued, JobStatus.running)))
        )
        if (started_from or {}).get("weights_id") == weights_id
    ]


def checkpoint_to_promote(session: Session, *, job_id: str) -> JobCheckpoint:
    """A finished job's best checkpoint, to register as weights: 422 for an unknown job, 409 while it
    is queued or running or when it has no best checkpoint.

    The jobs side of `app.weights.service.JobCheckpoints`.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise InvalidInput.field(["body", "from_job"], f"job {job_id!r} does not exist")
    if job.status not in FINISHED_STATUSES:
        raise Conflict(f"job {job_id!r} is {job.status}; promote it once it has finished")
    checkpoint = files.best_checkpoint(job)
    if checkpoint is None:
        raise Conflict(f"job {job_id!r} has no best checkpoint to promote (status {job.status})")
    return JobCheckpoint(job_id=job.id, job_name=job.name, path=checkpoint)
