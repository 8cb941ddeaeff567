"""GET /jobs/{id}/artifacts, downloads, and POST /jobs/{id}/export."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from app.api import ObjectId, PrincipalDep, SessionDep, SettingsDep
from app.artifacts import service
from app.artifacts.schemas import ArtifactList, ExportOptions, ExportOut
from app.openapi import problems
from app.storage import open_store

router = APIRouter(prefix="/jobs", tags=["artifacts"])
weights_router = APIRouter(prefix="/weights", tags=["artifacts"])

ArtifactName = Annotated[str, Path(min_length=1, max_length=1000, description="As in the listing.")]


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=problems(404, 422, 503))
def list_artifacts(
    job_id: ObjectId, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> ArtifactList:
    """The job's files (checkpoints, averaged model, TensorBoard event files, console log, ONNX export)
    with their sizes and download URLs."""
    return service.list_artifacts(session, settings=settings, job_id=job_id, scope=principal.scope)


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file.",
        },
        **problems(404, 422, 503),
    },
)
def download_artifact(
    job_id: ObjectId, name: ArtifactName, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Download one listed file; `name` as in the listing."""
    # The listed name, which may differ from the file's own (TensorBoard's names the host).
    filename = PurePosixPath(name).name
    store = open_store(settings)
    if store.is_local:
        path = service.artifact_path(session, job_id=job_id, name=name, scope=principal.scope)
        return FileResponse(path, filename=filename, media_type="application/octet-stream")
    found = service.stored_artifact(session, store=store, job_id=job_id, name=name, scope=principal.scope)
    # Opened now, so that a missing object or a failing store is a 404 or 503, not a cut-off body.
    body = store.open_stream(found.key)
    headers = {"Content-Length": str(found.size), "Content-Disposition": _attachment(filename)}
    return StreamingResponse(body, media_type="application/octet-stream", headers=headers)


def _attachment(filename: str) -> str:
    """Content-Disposition for a download named `filename`, as `FileResponse` writes it."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


@router.post("/{job_id}/export", response_model=ExportOut, responses=problems(400, 404, 409, 422, 503))
async def export_job(
    job_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    options: ExportOptions | None = None,
) -> ExportOut:
    """Export the job's best model to ONNX (with its preprocessing and NMS); download it from
    `artifact.url`. A second call with the same options returns the existing file; other options
    get a file of their own. No body: the defaults. 409 while the job has no checkpoint; 422 for
    `fp16` on a server without a CUDA GPU."""
    # Export takes seconds: off the event loop, so other requests keep being answered.
    return await run_in_threadpool(
        service.export_onnx, session, settings=settings, job_id=job_id, scope=principal.scope, options=options
    )


@weights_router.get(
    "/{weights_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file.",
        },
        **problems(404, 422, 503),
    },
)
def download_weights_artifact(
    weights_id: ObjectId,
    name: ArtifactName,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> FileResponse:
    """Download registered weights' checkpoint (`weights.pth`) or ONNX export (`export/model.onnx`, or
    `export/model-<options>.onnx` for an export with options)."""
    path = service.weights_artifact_path(
        session, settings=settings, weights_id=weights_id, name=name, scope=principal.scope
    )
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")


@weights_router.post(
    "/{weights_id}/export", response_model=ExportOut, responses=problems(400, 404, 409, 422, 503)
)
async def export_weights(
    weights_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    options: ExportOptions | None = None,
) -> ExportOut:
    """Export registered weights to ONNX (with their preprocessing and NMS), with the same options as
    `POST /jobs/{id}/export` does for a job; download it from `artifact.url`."""
    return await run_in_threadpool(
        service.export_weights,
        session,
        settings=settings,
        weights_id=weights_id,
        scope=principal.scope,
        options=options,
    )
