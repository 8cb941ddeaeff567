"""What the API asks of jobs: create, read, list, cancel, resume, delete, and their metrics and events.

Functions take a session and keyword arguments and never commit: the request does. State changes go
through `app.jobs.lifecycle`, whose updates are conditional on the current status.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from app.auth.principal import PUBLISHED_TENANT, Principal, sees, visible
from app.datasets.formats import check_layout
from app.datasets.service import datasets_base, resolve_spec
from app.db import changed, serialize_on, utcnow
from app.errors import Conflict, DatasetError, InvalidInput, NotFound, PayloadTooLarge, TooManyRequests
from app.jobs import downsample, files, lifecycle, stored
from app.jobs.models import ACTIVE_STATUSES, FINISHED_STATUSES, JOBS, Job, JobEvent, JobStatus, Metric
from app.jobs.schemas import (
    BestMetric,
    EventOut,
    JobError,
    JobOut,
    JobSpec,
    MetricOut,
    Progress,
    StartedFrom,
)
from app.paths import is_inside, real
from app.queue import DEFAULT_POOL
from app.quotas import limit_details, quota_for
from app.redaction import Redactor
from app.settings import Settings
from app.storage import CACHE_FOLDER, StorageError, open_store
from app.webhooks import outbox, targets
from app.webhooks.models import DeliveryState, WebhookDelivery
from app.webhooks.schemas import WebhookDeliveryOut
from app.weights import folder
from app.weights import service as weights
from app.weights.models import Weights
from app.weights.service import Inspector, JobCheckpoint
from app.workers import service as workers

logger = logging.getLogger(__name__)

# A failed or cancelled job can continue from its checkpoint; a succeeded one is done.
RESUMABLE_STATUSES = (JobStatus.cancelled, JobStatus.failed)


def _field_error(loc: Sequence[str | int], message: str) -> InvalidInput:
    return InvalidInput.field(["body", *loc], message)


def _resolve_init(
    session: Session, *, spec: JobSpec, settings: Settings, scope: str | None, inspector: Inspector | None
) -> StartedFrom | None:
    """What `spec.init_from` names, checked now (it exists, it has a checkpoint, it is the same
    architecture); 422 on the field at fault. Published weights are registered if need be."""
    init = spec.init_from
    if init is None:
        return None
    if init.job_id is not None:
        source = session.get(Job, init.job_id)
        if source is None or not sees(source.tenant, scope):
            raise _field_error(["init_from", "job_id"], f"job {init.job_id!r} does not exist")
        if source.model != spec.model:
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} trained {source.model}; a {spec.model} cannot start from its checkpoint",
            )
        if not stored.has_checkpoint(settings, source, files.CKPT_BEST, files.CKPT_LATEST):
            raise _field_error(
                ["init_from", "job_id"],
                f"job {source.id!r} has no checkpoint to start from (status {source.status})",
            )
        return StartedFrom(job_id=source.id, name=source.name)
    if init.weights_id is not None:
        found = session.get(Weights, init.weights_id)
        if found is None or not sees(found.tenant, scope, PUBLISHED_TENANT):
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
    if not weights.has_file(settings, found.id):
        raise _field_error(loc, f"the file of weights {found.id!r} is missing from the weights store")
    return StartedFrom(
        weights_id=found.id,
        pretrained=init.pretrained,
        name=found.name,
        sha256=found.sha256,
        num_classes=found.num_classes,
    )


# How long a client over its job quota should wait before trying again: about one short job.
ACTIVE_JOBS_RETRY_AFTER_SECONDS = 60


def check_quota(
    session: Session, *, settings: Settings, principal: Principal, max_epochs: int, input_size: Sequence[int]
) -> None:
    """Before a job is queued (created or resumed): its compute (epochs x input pixels) within the
    tenant's bound (413), and room for one more queued or running job (429). Admins are exempt."""
    if principal.is_admin:
        return
    quota = quota_for(settings, principal.tenant)
    asked = max_epochs * input_size[0] * input_size[1]
    if asked > quota.epoch_pixels:
        raise PayloadTooLarge(
            f"max_epochs x input height x input width is {asked}, over this tenant's quota_epoch_pixels "
            f"({quota.epoch_pixels}); train fewer epochs or on smaller images",
            details=limit_details("epoch_pixels", quota.epoch_pixels),
        )
    # Counted under a per-tenant lock held to the commit, so concurrent submits cannot all see room.
    serialize_on(session, f"quota_active_jobs:{principal.tenant}", table=Job.__tablename__)
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant == principal.tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= quota.active_jobs:
        raise TooManyRequests(
            f"this tenant has {active} jobs queued or running, its quota_active_jobs; wait for one to "
            "finish (or cancel one) and try again",
            details=limit_details("active_jobs", quota.active_jobs),
            retry_after=ACTIVE_JOBS_RETRY_AFTER_SECONDS,
        )


def create_job(
    session: Session,
    *,
    spec: JobSpec,
    settings: Settings,
    principal: Principal,
    inspector: Inspector | None = None,
) -> Job:
    """Validate what the spec points at (dataset layout, init job or weights) and insert a queued job.

    `init_from.pretrained` registers the published file from the weights folder on first use, which
    `inspector` checks (default: the inference process). A webhook URL must name an allowed host.
    """
    if spec.webhook is not None:
        try:
            targets.check_url(settings, str(spec.webhook.url))
        except targets.Refused as exc:
            raise InvalidInput.field(["body", "webhook", "url"], str(exc)) from exc
    try:
        resolved = resolve_spec(session, settings=settings, spec=spec.dataset, scope=principal.scope)
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
    check_gpus(session, settings=settings, spec=spec)
    check_quota(
        session,
        settings=settings,
        principal=principal,
        max_epochs=spec.training.max_epochs,
        input_size=spec.input_size,
    )
    started_from = _resolve_init(
        session, spec=spec, settings=settings, scope=principal.scope, inspector=inspector
    )
    job = Job(
        name=spec.name,
        tenant=principal.tenant,
        scope=principal.scope,
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


def get_job(session: Session, *, job_id: str, scope: str | None) -> Job:
    """The job, or 404 when it does not exist or belongs to a tenant outside `scope`."""
    job = session.get(Job, job_id)
    if job is None or not sees(job.tenant, scope):
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session, *, status: JobStatus | None, limit: int, offset: int, scope: str | None
) -> tuple[Sequence[Job], int]:
    """Newest first."""
    query = select(Job).where(visible(Job.tenant, scope))
    count = select(func.count()).select_from(Job).where(visible(Job.tenant, scope))
    if status is not None:
        query = query.where(Job.status == status)
        count = count.where(Job.status == status)
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return rows, session.scalar(count) or 0


def request_cancel(session: Session, *, job_id: str, scope: str | None) -> Job:
    """Cancel a queued job at once, or ask a running one to stop. Idempotent; 409 once finished."""
    job = get_job(session, job_id=job_id, scope=scope)
    if not lifecycle.cancel_queued(session, job_id=job_id):
        lifecycle.request_stop(session, job_id=job_id)
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(f"job {job_id!r} already {job.status}; there is nothing to cancel")
    return job


def _current_status(session: Session, *, job_id: str) -> str:
    """The job's status as the database has it now; 404 once it is gone."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise NotFound(f"job {job_id!r} not found")
    return status


def check_gpus(
    session: Session, *, settings: Settings, spec: JobSpec, loc: Sequence[str] = ("body", "gpus")
) -> None:
    """422 when the spec asks for more GPUs than the largest live worker of its pool offers (live:
    seen within one lease, as /readyz counts them). With no live worker in the pool, 1 GPU is
    accepted (a worker may start later, the job waits queued) and more are refused."""
    if spec.gpus == 1:
        return
    offered = workers.largest_offer(session, queue=spec.queue or "", within=settings.lease_seconds)
    if spec.gpus > offered:
        pool = spec.queue or DEFAULT_POOL
        raise InvalidInput.field(
            list(loc),
            f"gpus: {spec.gpus} requested, but the largest worker of pool {pool!r} offers "
            f"{offered} GPU{'' if offered == 1 else 's'}",
        )


def resume_job(
    session: Session, *, settings: Settings, job_id: str, max_epochs: int | None, principal: Principal
) -> Job:
    """Queue a cancelled or failed job again, to continue from its last checkpoint (the worker picks
    the newest valid one). `max_epochs` (at least the current one, else 422) extends the training.

    409 while the job is queued or running, once it succeeded, when it has no checkpoint on disk, or
    when its status changed meanwhile. Its error, cancel request, lease and restart count are
    cleared; the caller sends it to the broker after committing.
    """
    job = get_job(session, job_id=job_id, scope=principal.scope)
    if job.status == JobStatus.succeeded:
        raise Conflict(
            f"job {job_id!r} already succeeded; to train it further, create a new job that starts "
            f'from its checkpoint ("init_from": {{"job_id": "{job_id}"}})'
        )
    if job.status not in RESUMABLE_STATUSES:
        raise Conflict(
            f"job {job_id!r} is {job.status} (not finished); only a cancelled or failed job can be "
            "resumed: wait for it to end, or cancel it first"
        )
    if max_epochs is not None and max_epochs < job.max_epochs:
        raise InvalidInput.field(
            ["body", "max_epochs"],
            f"must be at least the job's current max_epochs ({job.max_epochs}); leave it out to keep it",
        )
    check_quota(
        session,
        settings=settings,
        principal=principal,
        max_epochs=max_epochs or job.max_epochs,
        input_size=JobSpec.model_validate(job.spec).input_size,
    )
    check_gpus(session, settings=settings, spec=JobSpec.model_validate(job.spec), loc=["spec", "gpus"])
    checkpoint = stored.checkpoint_location(settings, job, files.CKPT_LATEST, files.CKPT_BEST)
    if checkpoint is None:
        raise Conflict(
            f"job {job_id!r} has no checkpoint to resume from (it stopped before its first epoch "
            "ended, or its files were removed); submit it again with POST /jobs"
        )
    epochs = job.max_epochs if max_epochs is None else max_epochs
    values: dict[str, Any] = {
        "status": JobStatus.queued,
        "finished_at": None,
        "error_reason": None,
        "error_message": None,
        "cancel_requested_at": None,
        "enqueued_at": None,
        "lease_expires_at": None,
        # A fresh budget of automatic restarts: the earlier attempts' losses were dealt with.
        "restarts": 0,
    }
    if max_epochs is not None:
        # The column and the spec the worker trains from must agree.
        spec = copy.deepcopy(job.spec)
        spec.setdefault("training", {})["max_epochs"] = max_epochs
        values.update(max_epochs=max_epochs, spec=spec)
    # Conditional on the status read above: a concurrent resume, or a delete, wins at most once.
    if not changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RESUMABLE_STATUSES))
        .values(**values)
        .execution_options(synchronize_session=False),
    ):
        status = _current_status(session, job_id=job_id)
        raise Conflict(f"job {job_id!r} changed meanwhile (it is {status} now); look at it and retry")
    lifecycle.add_event(
        session,
        job_id=job_id,
        kind="state",
        message=f"resume requested (from {PurePosixPath(checkpoint).name}; max_epochs {epochs})",
        data={"checkpoint": checkpoint, "max_epochs": epochs},
    )
    session.flush()
    session.refresh(job)
    return job


def jobs_starting_from(session: Session, *, job_id: str) -> list[str]:
    """Queued or running jobs whose spec starts from this job's checkpoint (`init_from.job_id`)."""
    users = []
    for user_id, spec in session.execute(select(Job.id, Job.spec).where(Job.status.in_(ACTIVE_STATUSES))):
        init = (spec or {}).get("init_from")
        if isinstance(init, dict) and init.get("job_id") == job_id:
            users.append(user_id)
    return users


def _job_dir_to_remove(settings: Settings, job: Job) -> Path | None:
    """The job's directory if it is one this service may delete: strictly inside the jobs folder,
    and not a symlink (whose target could be anything, another job's folder included). None with
    a remote store: the directory is the training machine's (`remove_stored_job` removes the files)."""
    if not job.job_dir or not open_store(settings).is_local:
        return None
    path = Path(job.job_dir)
    if path.is_symlink() or not is_inside(path, settings.jobs_dir) or real(path) == real(settings.jobs_dir):
        logger.warning(
            "job %s: its directory %s is not one of the jobs folder's; left in place", job.id, path
        )
        return None
    return path


def delete_job(session: Session, *, settings: Settings, job_id: str, scope: str | None) -> Path | None:
    """Delete a finished job's rows (its events and metric points cascade); returns its directory,
    to remove once the caller has committed (None when there is nothing it may remove).

    404 for an unknown job; 409 while it is queued or running (cancel it first), or while a queued or
    running job starts from its checkpoint (`job_ids` names them). Weights promoted from the job are
    files of their own and stay.
    """
    job = get_job(session, job_id=job_id, scope=scope)
    if job.status not in FINISHED_STATUSES:
        raise Conflict(
            f"job {job_id!r} is {job.status}; cancel it first (POST /jobs/{job_id}/cancel) and delete "
            "it once it has stopped"
        )
    users = jobs_starting_from(session, job_id=job_id)
    if users:
        raise Conflict(
            f"job {job_id!r} is the starting checkpoint of {len(users)} queued or running job(s): "
            f"{', '.join(users[:10])}; cancel them or wait for them to finish",
            details=users,
        )
    job_dir = _job_dir_to_remove(settings, job)
    # Conditional on the status read above, so a job resumed meanwhile is not deleted from under it.
    if not changed(
        session,
        delete(Job)
        .where(Job.id == job_id, Job.status.in_(FINISHED_STATUSES))
        .execution_options(synchronize_session=False),
    ):
        status = _current_status(session, job_id=job_id)
        raise Conflict(f"job {job_id!r} changed meanwhile (it is {status} now); look at it and retry")
    session.expunge(job)
    return job_dir


def remove_stored_job(settings: Settings, job_id: str) -> None:
    """Delete a deleted job's objects from a remote store, and this machine's cached copies of them
    (nothing with the local store: `remove_job_dir` removes the files). What cannot be removed is
    logged and left, as `remove_job_dir` does: the rows are gone already."""
    store = open_store(settings)
    if store.is_local:
        return
    try:
        removed = store.delete_prefix(files.job_key(job_id))
        logger.info("job %s: %d object(s) removed from %s", job_id, removed, store.url)
    except StorageError as exc:
        logger.warning("could not remove the objects of deleted job %s: %s", job_id, exc)
    remove_job_dir(settings.home / CACHE_FOLDER / files.job_key(job_id))


def remove_job_dir(path: Path) -> None:
    """Delete a deleted job's directory. What cannot be removed is logged and left: its rows are gone
    already, so nothing points to it any more."""

    def log_failure(function: object, name: str, exc_info: Any) -> None:
        logger.warning("could not remove %s of a deleted job: %s", name, exc_info[1])

    if path.exists():
        shutil.rmtree(path, onerror=log_failure)


def list_metrics(
    session: Session, *, job_id: str, names: Sequence[str], cursor: int | None, limit: int, scope: str | None
) -> Sequence[Metric]:
    get_job(session, job_id=job_id, scope=scope)
    query = select(Metric).where(Metric.job_id == job_id)
    if names:
        query = query.where(Metric.name.in_(names))
    if cursor is not None:
        query = query.where(Metric.id > cursor)
    return session.scalars(query.order_by(Metric.id).limit(limit)).all()


def list_events(
    session: Session, *, job_id: str, cursor: int | None, limit: int, scope: str | None
) -> Sequence[JobEvent]:
    get_job(session, job_id=job_id, scope=scope)
    return events_between(session, job_id=job_id, after=cursor or 0, upto=None, limit=limit)


# A job's rows read in id order: its events and its metric points.
JobRow = TypeVar("JobRow", JobEvent, Metric)


def rows_between(
    session: Session, model: type[JobRow], *, job_id: str, after: int, upto: int | None, limit: int
) -> Sequence[JobRow]:
    """A job's events or metric points with `after < id <= upto` (no upper bound for None), oldest first."""
    query = select(model).where(model.job_id == job_id, model.id > after)
    if upto is not None:
        query = query.where(model.id <= upto)
    return session.scalars(query.order_by(model.id).limit(limit)).all()


def events_between(
    session: Session, *, job_id: str, after: int, upto: int | None, limit: int
) -> Sequence[JobEvent]:
    """A job's events with `after < id <= upto` (no upper bound for None), oldest first."""
    return rows_between(session, JobEvent, job_id=job_id, after=after, upto=upto, limit=limit)


def list_webhooks(session: Session, *, job_id: str, scope: str | None) -> Sequence[WebhookDelivery]:
    """The job's webhook messages, oldest first; 404 as for the job."""
    get_job(session, job_id=job_id, scope=scope)
    return outbox.of_job(session, job_id=job_id)


def webhook_out(delivery: WebhookDelivery, redact: Redactor | None) -> WebhookDeliveryOut:
    """The API's view of a message; the last error redacted for a non-admin caller."""
    error = delivery.last_error
    return WebhookDeliveryOut(
        id=delivery.id,
        event=delivery.event,
        status=str(delivery.payload.get("status")),
        url=delivery.url,
        state=DeliveryState(delivery.state),
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_error=redact.text(error) if redact is not None and error else error,
        created_at=delivery.created_at,
        next_attempt_at=delivery.next_attempt_at if delivery.state == DeliveryState.pending else None,
        completed_at=delivery.completed_at,
    )


def metrics_between(
    session: Session, *, job_id: str, after: int, upto: int | None, limit: int
) -> Sequence[Metric]:
    """A job's metric points with `after < id <= upto` (no upper bound for None), oldest first."""
    return rows_between(session, Metric, job_id=job_id, after=after, upto=upto, limit=limit)


def downsampled_metrics(
    session: Session,
    *,
    job_id: str,
    names: Sequence[str],
    cursor: int | None,
    max_points: int,
    scope: str | None,
) -> tuple[list[Metric], int | None]:
    """Every point after `cursor` (of `names`, or all series), at most `max_points` per series
    (`app.jobs.downsample.min_max`), in the order they were recorded; and the id of the newest
    point read (kept or not), None when there was none: the cursor to poll or stream from."""
    get_job(session, job_id=job_id, scope=scope)
    query = select(Metric).where(Metric.job_id == job_id)
    if names:
        query = query.where(Metric.name.in_(names))
    if cursor is not None:
        query = query.where(Metric.id > cursor)
    series: dict[str, list[Metric]] = {}
    newest: int | None = None
    for row in session.scalars(query.order_by(Metric.id)):
        series.setdefault(row.name, []).append(row)
        newest = row.id
    kept = [
        p for points in series.values() for p in downsample.min_max(points, max_points, lambda m: m.value)
    ]
    return sorted(kept, key=lambda m: m.id), newest


def metric_to_out(row: Metric) -> MetricOut:
    return MetricOut(name=row.name, epoch=row.epoch, step=row.step, value=row.value, time=row.time)


def event_to_out(row: JobEvent, redact: Redactor | None) -> EventOut:
    """An event as the API shows it; with `redact` (a non-admin caller), without host details."""
    if redact is None:
        return EventOut(
            id=row.id, time=row.time, kind=row.kind, level=row.level, message=row.message, data=row.data
        )
    return EventOut(
        id=row.id,
        time=row.time,
        kind=row.kind,
        level=row.level,
        message=redact.text(row.message),
        data=redact.data(row.data),
    )


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


def to_out(job: Job, redact: Redactor | None) -> JobOut:
    """The API's view of a job; with `redact` (a non-admin caller), without host details."""
    out = JobOut(
        id=job.id,
        tenant=job.tenant,
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
    if redact is None:
        return out
    return out.model_copy(
        update={
            "worker": redact.text(out.worker) if out.worker else None,
            "job_dir": None,
            "error": out.error.model_copy(update={"message": redact.text(out.error.message)})
            if out.error
            else None,
            "artifacts": {kind: redact.text(path) for kind, path in out.artifacts.items()},
        }
    )


def jobs_using_dataset(session: Session, *, settings: Settings, dataset_id: str, folder: Path) -> list[str]:
    """Queued or running jobs that read a dataset: by its id, or by a path inside its folder.

    The jobs side of `app.datasets.service.DatasetUsers`.
    """
    users = []
    active = select(Job.id, Job.spec, Job.scope).where(Job.status.in_(ACTIVE_STATUSES))
    for job_id, spec, scope in session.execute(active):
        dataset = (spec or {}).get("dataset") or {}
        if dataset.get("id") == dataset_id:
            users.append(job_id)
        elif isinstance(dataset.get("path"), str) and is_inside(
            datasets_base(settings, scope) / dataset["path"], folder
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
            select(Job.id, Job.started_from).where(Job.status.in_(ACTIVE_STATUSES))
        )
        if (started_from or {}).get("weights_id") == weights_id
    ]


def checkpoint_to_promote(
    session: Session, *, settings: Settings, job_id: str, scope: str | None
) -> JobCheckpoint:
    """A finished job's best checkpoint, to register as weights: 422 for an unknown job, 409 while it
    is queued or running or when it has no best checkpoint.

    The jobs side of `app.weights.service.JobCheckpoints`.
    """
    job = session.get(Job, job_id)
    if job is None or not sees(job.tenant, scope):
        raise InvalidInput.field(["body", "from_job"], f"job {job_id!r} does not exist")
    if job.status not in FINISHED_STATUSES:
        raise Conflict(f"job {job_id!r} is {job.status}; promote it once it has finished")
    # With a remote store: the store cache's copy, which the weights registry copies.
    checkpoint = stored.local_checkpoint(settings, job, files.CKPT_BEST)
    if checkpoint is None:
        raise Conflict(f"job {job_id!r} has no best checkpoint to promote (status {job.status})")
    return JobCheckpoint(job_id=job.id, job_name=job.name, path=checkpoint)


# Built once, a Core statement of ids only: every API process runs it twice a second, beside
# trainings on the same cores, and almost always finds nothing (0.30 ms of CPU in a loop against
# 0.65 for the ORM query of whole rows it replaced).
_SUCCEEDED_SINCE = (
    select(JOBS.c.id)
    .where(JOBS.c.status == JobStatus.succeeded, JOBS.c.finished_at > bindparam("since"))
    .order_by(JOBS.c.finished_at, JOBS.c.id)
    .limit(bindparam("limit"))
)


def succeeded_since(session: Session, *, since: datetime, limit: int) -> Sequence[Job]:
    """Jobs of every tenant that succeeded after `since`, oldest first (for the API's model warmer)."""
    ids = session.scalars(_SUCCEEDED_SINCE, {"since": since, "limit": limit}).all()
    if not ids:
        return []
    return session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.finished_at, Job.id)).all()
