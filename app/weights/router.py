"""HTTP endpoints for weights: register (upload a checkpoint, or promote a job's), list, get, delete."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api import ObjectId, PrincipalDep, SessionDep, SettingsDep
from app.auth.principal import Principal
from app.db import get_sessionmaker
from app.errors import InvalidInput, PayloadTooLarge
from app.limits import too_large
from app.ml.types import ModelName
from app.openapi import form_body, problems
from app.schemas import MAX_OFFSET, PRINTABLE_PATTERN
from app.settings import Settings
from app.uploads import Received, media_type, receive_file
from app.weights import service, stored
from app.weights.models import Weights, WeightsSource
from app.weights.schemas import PromoteRequest, WeightsOut, WeightsPage, WeightsUploadForm

router = APIRouter(prefix="/weights", tags=["weights"])

_PRINTABLE = re.compile(PRINTABLE_PATTERN)
JSON_TYPE = "application/json"
MAX_JSON_BYTES = 64 * 1024
NAME_MAX = 200


def to_out(weights: Weights) -> WeightsOut:
    """The API's view of registered weights."""
    return WeightsOut(
        id=weights.id,
        tenant=weights.tenant,
        name=weights.name,
        model=weights.model,
        num_classes=weights.num_classes,
        classes=weights.classes or [f"class_{i}" for i in range(weights.num_classes)],
        size_bytes=weights.size_bytes,
        sha256=weights.sha256,
        source=weights.source,
        job_id=weights.job_id,
        pretrained=weights.pretrained,
        created_at=weights.created_at,
    )


def get_weights_users(request: Request) -> service.WeightsUsers:
    """Who starts from weights: the jobs area's answer, wired in by `app.main`."""
    users: service.WeightsUsers = request.app.state.weights_users
    return users


def get_job_checkpoints(request: Request) -> service.JobCheckpoints:
    """A job's best checkpoint: the jobs area's answer, wired in by `app.main`."""
    checkpoints: service.JobCheckpoints = request.app.state.job_checkpoints
    return checkpoints


def _too_large(settings: Settings) -> PayloadTooLarge:
    limit = settings.weights_max_bytes
    return too_large("weights_max_bytes", limit, f"the checkpoint is larger than weights_max_bytes ({limit})")


def _field_error(field: str, message: str) -> InvalidInput:
    return InvalidInput.field(["body", field], message, message=f"{field}: {message}")


def _name(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > NAME_MAX or not _PRINTABLE.match(value):
        raise _field_error("name", f"must be 1 to {NAME_MAX} printable characters")
    return value


def _model(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if value not in get_args(ModelName):
        raise _field_error("model", f"{value!r} is not one of {', '.join(get_args(ModelName))}")
    return value


def _default_name(received: Received) -> str:
    """The uploaded file's own name (its last part, printable, at most 200 characters), else a name
    from the hash."""
    raw = PurePosixPath((received.filename or "").replace("\\", "/")).name
    cleaned = "".join(c for c in raw if c.isprintable())[:NAME_MAX].strip()
    return cleaned or f"weights-{received.sha256[:12]}"


async def _promote_request(request: Request) -> PromoteRequest:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise InvalidInput(f"the JSON body is longer than {MAX_JSON_BYTES} bytes")
    try:
        return PromoteRequest.model_validate_json(body)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = [
            {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
        summary = "; ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in errors)
        raise InvalidInput(summary, details=errors) from exc


def _register_upload(
    settings: Settings,
    received: Received,
    staged: service.Staged,
    principal: Principal,
    name: str | None,
    model: str | None,
) -> tuple[Weights, bool]:
    return service.register_staged(
        settings,
        staged=staged,
        tenant=principal.tenant,
        charge=principal,
        name=name or _default_name(received),
        inspector=service.model_server_inspector(settings),
        source=WeightsSource.upload,
        expected_model=model,
    )


def _promote(
    settings: Settings, body: PromoteRequest, checkpoints: service.JobCheckpoints, principal: Principal
) -> tuple[Weights, bool]:
    session = get_sessionmaker(settings.database_url)()
    try:
        found = checkpoints(session, settings=settings, job_id=body.from_job, scope=principal.scope)
    finally:
        session.close()
    staged = service.stage_copy(settings, found.path)
    try:
        return service.register_staged(
            settings,
            staged=staged,
            tenant=principal.tenant,
            charge=principal,
            name=body.name or found.job_name or f"job-{found.job_id}",
            inspector=service.model_server_inspector(settings),
            source=WeightsSource.job,
            job_id=found.job_id,
        )
    finally:
        staged.path.unlink(missing_ok=True)


_PROMOTE_SCHEMA = PromoteRequest.model_json_schema()
RAW_TYPE = "application/octet-stream"
_RAW_CHECKPOINT = {"type": "string", "format": "binary", "description": "A YOLO-NAS checkpoint file."}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WeightsOut,
    openapi_extra=form_body(WeightsUploadForm, **{JSON_TYPE: _PROMOTE_SCHEMA, RAW_TYPE: _RAW_CHECKPOINT}),
    responses={
        200: {
            "model": WeightsOut,
            "description": "The same file (SHA-256) was registered already: those weights.",
        },
        **problems(409, 413, 415, 422, 503),
    },
)
async def create_weights(
    request: Request,
    settings: SettingsDep,
    principal: PrincipalDep,
    checkpoints: Annotated[service.JobCheckpoints, Depends(get_job_checkpoints)],
    name: Annotated[str | None, Query(min_length=1, max_length=NAME_MAX, pattern=PRINTABLE_PATTERN)] = None,
    model: Annotated[ModelName | None, Query(description="Expected architecture.")] = None,
) -> Response:
    """Register a YOLO-NAS checkpoint: upload it (multipart field `file`, optional fields `name` and
    `model`, or the raw file as an `application/octet-stream` body with `?name=&model=`), or promote a
    finished job's best checkpoint (JSON `{"from_job": "<job id>"}`).

    The file streams to disk under `SGJOBS_WEIGHTS_MAX_BYTES` (413); the inference process loads it
    with `weights_only=True` and checks it is a complete YOLO-NAS S, M or L state dict (`net`,
    `ema_net` or bare), recognising the architecture from the tensor shapes (422 when `model` says
    otherwise) and reading the number of classes and their names. 201 with the new weights; 200 with
    the registered ones when the same file (by SHA-256) was registered before.
    """
    if media_type(request) == JSON_TYPE:
        body = await _promote_request(request)
        weights, created = await run_in_threadpool(_promote, settings, body, checkpoints, principal)
    else:
        target = service.staging_file(settings)
        try:
            received = await receive_file(
                request,
                target,
                max_bytes=settings.weights_max_bytes,
                too_large=lambda: _too_large(settings),
                raw_types=(RAW_TYPE,),
                unsupported="send the checkpoint as multipart/form-data (field 'file') or as an "
                'application/octet-stream body, or JSON {"from_job": "<job id>"} to register a job\'s '
                "best checkpoint",
            )
            staged = service.Staged(target, received.size, received.sha256)
            # Inspection loads the file in the inference process: off the event loop.
            weights, created = await run_in_threadpool(
                _register_upload,
                settings,
                received,
                staged,
                principal,
                name or _name(received.fields.get("name")),
                model or _model(received.fields.get("model")),
            )
        finally:
            target.unlink(missing_ok=True)  # already moved into the store when registered
    return JSONResponse(
        to_out(weights).model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@router.get("", response_model=WeightsPage, responses=problems(422, 503))
def list_weights(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> WeightsPage:
    """Registered weights, newest first."""
    rows, total = service.list_weights(session, limit=limit, offset=offset, scope=principal.scope)
    return WeightsPage(items=[to_out(w) for w in rows], total=total, limit=limit, offset=offset)


@router.get("/{weights_id}", response_model=WeightsOut, responses=problems(404, 422, 503))
def get_weights(weights_id: ObjectId, session: SessionDep, principal: PrincipalDep) -> WeightsOut:
    """Registered weights: architecture, classes, size and hash."""
    return to_out(service.get_weights(session, weights_id=weights_id, scope=principal.scope))


@router.delete(
    "/{weights_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(403, 404, 409, 422, 503),
)
def delete_weights(
    weights_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    users: Annotated[service.WeightsUsers, Depends(get_weights_users)],
) -> Response:
    """Unregister weights and delete their file; 409 (naming the jobs) while a queued or running job
    starts from them. A published file still in the weights folder is registered again when asked for."""
    paths = service.delete_weights(
        session, settings=settings, weights_id=weights_id, users=users, scope=principal.scope
    )
    session.commit()
    service.remove_files(paths)
    stored.delete_stored(settings, weights_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
