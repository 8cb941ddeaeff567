"""HTTP endpoints for jobs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status
from pydantic import StringConstraints

from app.api import ObjectId, PrincipalDep, RedactorDep, SessionDep, SettingsDep
from app.jobs import dispatch, service
from app.jobs.models import JobStatus
from app.jobs.schemas import (
    EventOut,
    EventPage,
    JobOut,
    JobPage,
    JobSpec,
    MetricOut,
    MetricPage,
    ResumeRequest,
)
from app.openapi import problems
from app.schemas import MAX_OFFSET
from app.webhooks.schemas import WebhookDeliveryList

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

# A cursor is a row id as returned in `next_cursor`: digits only, and small enough for a 64-bit column.
Cursor = Annotated[
    str | None,
    Query(pattern=r"^[0-9]{1,18}$", description="`next_cursor` of the previous page: only newer items."),
]


# Series names as the training writes them; no control characters (PostgreSQL refuses NUL).
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]


def _cursor(value: str | None) -> int | None:
    return None if value is None else int(value)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses=problems(400, 413, 422, 429, 503),
)
def create_job(
    spec: JobSpec, session: SessionDep, settings: SettingsDep, principal: PrincipalDep, redact: RedactorDep
) -> JobOut:
    """Validate a job spec and queue the job."""
    job = service.create_job(session, spec=spec, settings=settings, principal=principal)
    session.commit()
    # Sent only after the commit, so the worker always finds the job. If the broker is down the job
    # stays queued (marked unsent) and a worker's sweeper sends it later: a 201 is never lost.
    dispatch.send(settings, job_id=job.id)
    return service.to_out(job, redact)


@router.get("", response_model=JobPage, responses=problems(422, 503))
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    redact: RedactorDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    """Jobs, newest first."""
    jobs, total = service.list_jobs(
        session, status=status_, limit=limit, offset=offset, scope=principal.scope
    )
    return JobPage(items=[service.to_out(j, redact) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=problems(404, 422, 503))
def get_job(job_id: ObjectId, session: SessionDep, principal: PrincipalDep, redact: RedactorDep) -> JobOut:
    """A job: status, progress with ETA, best metric, error, artifacts."""
    return service.to_out(service.get_job(session, job_id=job_id, scope=principal.scope), redact)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problems(404, 409, 422, 503),
)
def cancel_job(job_id: ObjectId, session: SessionDep, principal: PrincipalDep, redact: RedactorDep) -> JobOut:
    """Cancel a queued job, or ask a running one to stop (within one batch). Idempotent; 409 once
    the job succeeded or failed."""
    job = service.request_cancel(session, job_id=job_id, scope=principal.scope)
    session.commit()
    return service.to_out(job, redact)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(404, 409, 422, 503),
)
def delete_job(
    job_id: ObjectId, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Delete a finished job: its record, events, metrics and directory (weights promoted from it
    stay). 409 while it is queued or running (cancel it first), or while a queued or running job
    starts from its checkpoint (`job_ids` names them)."""
    job_dir = service.delete_job(session, settings=settings, job_id=job_id, scope=principal.scope)
    # Rows first: if removing the files fails, files are left over, never rows pointing to nothing.
    session.commit()
    if job_dir is not None:
        service.remove_job_dir(job_dir)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problems(400, 404, 409, 413, 422, 429, 503),
)
def resume_job(
    job_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    redact: RedactorDep,
    # Optional, and an object when given: a nullable body would make generated clients send `null`.
    body: Annotated[ResumeRequest, Body(default_factory=ResumeRequest)],
) -> JobOut:
    """Queue a cancelled or failed job again to continue from its last checkpoint, optionally with a
    larger `max_epochs`. 409 while it is queued or running, once it succeeded, or without a
    checkpoint."""
    job = service.resume_job(
        session, settings=settings, job_id=job_id, max_epochs=body.max_epochs, principal=principal
    )
    session.commit()
    dispatch.send(settings, job_id=job.id)
    return service.to_out(job, redact)


@router.get("/{job_id}/metrics", response_model=MetricPage, responses=problems(404, 422, 503))
def list_job_metrics(
    job_id: ObjectId,
    session: SessionDep,
    principal: PrincipalDep,
    name: Annotated[
        list[MetricName], Query(default_factory=list, description="Only these series (repeatable).")
    ],
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> MetricPage:
    """Metric points in the order they were recorded; poll with ?cursor=<next_cursor> for new ones."""
    rows = service.list_metrics(
        session, job_id=job_id, names=name, cursor=_cursor(cursor), limit=limit, scope=principal.scope
    )
    return MetricPage(
        items=[MetricOut(name=r.name, epoch=r.epoch, step=r.step, value=r.value, time=r.time) for r in rows],
        next_cursor=str(rows[-1].id) if rows else cursor,
    )


@router.get("/{job_id}/events", response_model=EventPage, responses=problems(404, 422, 503))
def list_job_events(
    job_id: ObjectId,
    session: SessionDep,
    principal: PrincipalDep,
    redact: RedactorDep,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> EventPage:
    """State changes, warnings and log lines of a job."""
    rows = service.list_events(
        session, job_id=job_id, cursor=_cursor(cursor), limit=limit, scope=principal.scope
    )
    return EventPage(
        items=[
            EventOut(id=r.id, time=r.time, kind=r.kind, level=r.level, message=r.message, data=r.data)
            if redact is None
            else EventOut(
                id=r.id,
                time=r.time,
                kind=r.kind,
                level=r.level,
                message=redact.text(r.message),
                data=redact.data(r.data),
            )
            for r in rows
        ],
        next_cursor=str(rows[-1].id) if rows else cursor,
    )


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=problems(404, 422, 503))
def list_job_webhooks(
    job_id: ObjectId, session: SessionDep, principal: PrincipalDep, redact: RedactorDep
) -> WebhookDeliveryList:
    """The job's webhook messages (one per time it ended), oldest first, and how sending each went."""
    rows = service.list_webhooks(session, job_id=job_id, scope=principal.scope)
    return WebhookDeliveryList(items=[service.webhook_out(r, redact) for r in rows])
