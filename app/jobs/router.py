"""HTTP endpoints for jobs."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status
from pydantic import StringConstraints, WithJsonSchema
from sse_starlette import EventSourceResponse

from app.api import ObjectId, PrincipalDep, RedactorDep, SessionDep, SettingsDep
from app.db import session_scope
from app.jobs import dispatch, service, stream
from app.jobs.downsample import MIN_POINTS
from app.jobs.models import JobStatus
from app.jobs.schemas import (
    EventPage,
    JobOut,
    JobPage,
    JobSpec,
    MetricPage,
    ResumeRequest,
)
from app.openapi import problems
from app.schemas import MAX_OFFSET
from app.webhooks.schemas import WebhookDeliveryList

# The most points per series GET /jobs/{id}/metrics?max_points= returns.
MAX_POINTS = 10000

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
    service.remove_stored_job(settings, job_id)
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
    limit: Annotated[int, Query(ge=1, le=10000, description="Points per page (not with max_points).")] = 1000,
    max_points: Annotated[
        int | None,
        Query(
            ge=MIN_POINTS,
            le=MAX_POINTS,
            description="Downsample on the server: every point after `cursor` in one answer, at most "
            "this many per series, always with each series' first and last point and, per bucket, "
            "its lowest and highest (min/max buckets). `limit` does not apply; `next_cursor` is the "
            "newest point read, to poll or stream (`<event>.<next_cursor>.0`) from.",
        ),
    ] = None,
) -> MetricPage:
    """Metric points in the order they were recorded; poll with ?cursor=<next_cursor> for new ones."""
    if max_points is not None:
        rows, newest = service.downsampled_metrics(
            session,
            job_id=job_id,
            names=name,
            cursor=_cursor(cursor),
            max_points=max_points,
            scope=principal.scope,
        )
        next_cursor = str(newest) if newest is not None else cursor
    else:
        rows = list(
            service.list_metrics(
                session, job_id=job_id, names=name, cursor=_cursor(cursor), limit=limit, scope=principal.scope
            )
        )
        next_cursor = str(rows[-1].id) if rows else cursor
    return MetricPage(items=[service.metric_to_out(r) for r in rows], next_cursor=next_cursor)


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
        items=[service.event_to_out(r, redact) for r in rows],
        next_cursor=str(rows[-1].id) if rows else cursor,
    )


def get_stream_hub(request: Request) -> stream.StreamHub:
    hub: stream.StreamHub = request.app.state.job_streams
    return hub


_STREAM_ID = "`<event>.<metric>.<n>`, the `id:` of the last message received"
# Documented as a string, not "string or null": left out is how a client says "from the start" (a
# generated client would otherwise send the header as `null`).
_StreamId = WithJsonSchema({"type": "string", "pattern": stream.ID_PATTERN})
# What each message is (OpenAPI 3.2's reading of a text/event-stream schema: one event), its
# `data` a JSON document of the schema its `event` names.
_STREAM_DATA = {
    "status": "JobOut",
    "progress": "Progress",
    "metric": "MetricOut",
    "event": "EventOut",
    "superseded": "EventOut",
}
_STREAM_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {"type": "string", "enum": list(_STREAM_DATA)},
        "id": {"type": "string", "pattern": stream.ID_PATTERN},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "allOf": [
        {
            "if": {"properties": {"event": {"const": name}}},
            "then": {
                "properties": {
                    "data": {
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": f"#/components/schemas/{schema}"},
                    }
                }
            },
        }
        for name, schema in _STREAM_DATA.items()
    ],
}


@router.get(
    "/{job_id}/stream",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `status`, `progress`, `metric`, `event` and `superseded` "
            "messages (JSON data), each with an `id:`, and keep-alive comments.",
            "content": {"text/event-stream": {"itemSchema": _STREAM_EVENT_SCHEMA}},
        },
        **problems(404, 422, 503),
    },
)
async def stream_job(
    job_id: ObjectId,
    principal: PrincipalDep,
    redact: RedactorDep,
    settings: SettingsDep,
    hub: Annotated[stream.StreamHub, Depends(get_stream_hub)],
    last_event_id_header: Annotated[
        str | None,
        _StreamId,
        Header(
            alias="Last-Event-ID",
            pattern=stream.ID_PATTERN,
            description=f"Resume after {_STREAM_ID} (EventSource sends it when it reconnects).",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        _StreamId,
        Query(
            pattern=stream.ID_PATTERN,
            description=f"Resume after {_STREAM_ID}, for clients that cannot set the header "
            "(the header wins when both are given).",
        ),
    ] = None,
) -> EventSourceResponse:
    """The job's status, progress, metric points and events as they are written (Server-Sent
    Events). A stream starts with the current `progress` and `status`; without an id it then sends
    the whole history. It ends after a terminal status, or after the server's stream_max_seconds
    (reconnect with `Last-Event-ID`: nothing is lost or repeated). `superseded` (an event row): an
    attempt resuming at epoch `data.superseded_from_epoch` deleted the points of that epoch and
    later; drop them, the new attempt's follow."""
    scope = principal.scope

    def check() -> None:
        with session_scope(settings.database_url) as session:
            service.get_job(session, job_id=job_id, scope=scope)

    # 404 (another tenant's job, or none) before the stream starts.
    await hub.run_db(check)
    cursor = stream.Cursor.parse(last_event_id_header or last_event_id)
    return EventSourceResponse(
        stream.job_stream(hub, job_id=job_id, cursor=cursor, redact=redact),
        ping=settings.stream_ping_seconds,
    )


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=problems(404, 422, 503))
def list_job_webhooks(
    job_id: ObjectId, session: SessionDep, principal: PrincipalDep, redact: RedactorDep
) -> WebhookDeliveryList:
    """The job's webhook messages (one per time it ended), oldest first, and how sending each went."""
    rows = service.list_webhooks(session, job_id=job_id, scope=principal.scope)
    return WebhookDeliveryList(items=[service.webhook_out(r, redact) for r in rows])
