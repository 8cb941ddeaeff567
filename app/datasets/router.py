"""HTTP endpoints for datasets: upload (zip or tar), list, get, delete, validate."""

from __future__ import annotations

import re
import uuid
from pathlib import Path as FilePath
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.api import ObjectId, PrincipalDep, SessionDep, SettingsDep
from app.auth.principal import Principal
from app.datasets import service
from app.datasets.archive import ArchiveTooLarge
from app.datasets.models import Dataset
from app.datasets.schemas import (
    BboxFormat,
    DatasetOptions,
    DatasetOut,
    DatasetPage,
    ValidationReport,
    report_model,
)
from app.datasets.stored import delete_upload
from app.db import get_sessionmaker
from app.errors import InvalidInput, broken_limit
from app.openapi import form_body, problems
from app.schemas import MAX_OFFSET, PRINTABLE_PATTERN
from app.settings import Settings
from app.uploads import receive_file

router = APIRouter(prefix="/datasets", tags=["datasets"])

_PRINTABLE = re.compile(PRINTABLE_PATTERN)

RAW_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/x-tar",
        "application/gzip",
        "application/x-gzip",
        "application/x-bzip2",
        "application/x-xz",
        "application/octet-stream",
    }
)


class UploadForm(BaseModel):
    """The multipart form of an upload (streamed to disk by hand, to enforce the size limit while
    reading). The archive may instead be the whole body (`application/octet-stream`, or any of
    RAW_TYPES), with `name` and `bbox_format` in the query."""

    file: bytes = Field(description="A zip or tar(.gz/.bz2/.xz) archive.")
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=PRINTABLE_PATTERN)
    bbox_format: BboxFormat | None = Field(default=None, description="hf only; default xywh.")


_RAW_ARCHIVE = {"type": "string", "format": "binary", "description": "A zip or tar archive."}


def _out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        tenant=dataset.tenant,
        name=dataset.name,
        format=dataset.format,
        path=dataset.path,
        status=dataset.status,
        options=DatasetOptions.model_validate(dataset.options or {}),
        classes=dataset.classes,
        archive_bytes=dataset.archive_bytes,
        size_bytes=dataset.size_bytes,
        file_count=dataset.file_count,
        created_at=dataset.created_at,
        validated_at=dataset.validated_at,
        report=report_model(dataset.report),
    )


def _too_large(settings: Settings) -> ArchiveTooLarge:
    return ArchiveTooLarge(
        f"the upload is larger than upload_max_bytes ({settings.upload_max_bytes})",
        details=broken_limit("upload_max_bytes", settings.upload_max_bytes),
    )


async def _receive(request: Request, target: FilePath, settings: Settings) -> dict[str, str]:
    """Stream the request body to `target` (the archive); returns the small form fields, if any."""
    received = await receive_file(
        request,
        target,
        max_bytes=settings.upload_max_bytes,
        too_large=lambda: _too_large(settings),
        raw_types=RAW_TYPES,
        unsupported=(
            "send the archive as multipart/form-data (field 'file') or as the raw body with "
            "content-type application/zip, application/x-tar, application/gzip or application/octet-stream"
        ),
    )
    return received.fields


def _register(
    settings: Settings, archive: FilePath, principal: Principal, name: str | None, bbox_format: str | None
) -> Dataset:
    session = get_sessionmaker(settings.database_url)()
    try:
        dataset = service.register_upload(
            session,
            settings=settings,
            archive=archive,
            principal=principal,
            name=name,
            bbox_format=bbox_format,
        )
        session.commit()
        return dataset
    finally:
        session.close()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    openapi_extra=form_body(UploadForm, **{"application/octet-stream": _RAW_ARCHIVE}),
    responses=problems(413, 415, 422, 503),
)
async def upload_dataset(
    request: Request,
    settings: SettingsDep,
    principal: PrincipalDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=_PRINTABLE.pattern)] = None,
    bbox_format: Annotated[BboxFormat | None, Query(description="hf only; default xywh.")] = None,
) -> DatasetOut:
    """Upload a zip or tar of a COCO, YOLO or Hugging Face dataset: multipart (field `file`, optional
    fields `name` and `bbox_format`) or the raw archive as the body (`?name=&bbox_format=`).

    The body streams to disk under the limits; the archive is extracted safely, its format detected
    and validated. 201 with the dataset and its validation report (status `invalid` if it has errors).
    """
    archive = service.staging_dir(settings) / f"{uuid.uuid4().hex}.upload"
    try:
        fields = await _receive(request, archive, settings)
        name = name or fields.get("name") or None
        raw_format = bbox_format or fields.get("bbox_format") or None
        if raw_format is not None and raw_format not in ("xyxy", "xywh", "cxcywh"):
            raise InvalidInput.field(["body", "bbox_format"], "bbox_format must be xyxy, xywh or cxcywh")
        if name is not None and not (1 <= len(name) <= 200 and _PRINTABLE.match(name)):
            raise InvalidInput.field(["body", "name"], "name must be 1 to 200 printable characters")
        # Extraction and validation read every file: off the event loop.
        dataset = await run_in_threadpool(_register, settings, archive, principal, name, raw_format)
    finally:
        await anyio.Path(archive).unlink(missing_ok=True)
    return _out(dataset)


@router.get("", response_model=DatasetPage, responses=problems(422, 503))
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetPage:
    """Registered datasets, newest first."""
    rows, total = service.list_datasets(session, limit=limit, offset=offset, scope=principal.scope)
    return DatasetPage(items=[_out(d) for d in rows], total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problems(404, 422, 503))
def get_dataset(dataset_id: ObjectId, session: SessionDep, principal: PrincipalDep) -> DatasetOut:
    """One dataset with its last validation report."""
    return _out(service.get_dataset(session, dataset_id=dataset_id, scope=principal.scope))


def get_dataset_users(request: Request) -> service.DatasetUsers:
    """Who uses a dataset: the jobs area's answer, wired in by `app.main`."""
    users: service.DatasetUsers = request.app.state.dataset_users
    return users


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problems(404, 409, 422, 503),
)
def delete_dataset(
    dataset_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    users: Annotated[service.DatasetUsers, Depends(get_dataset_users)],
) -> Response:
    """Unregister a dataset and delete its files; 409 (naming the jobs) while a queued or running job
    uses it."""
    folder = service.delete_dataset(
        session, settings=settings, dataset_id=dataset_id, users=users, scope=principal.scope
    )
    session.commit()
    service.remove_files(folder)
    delete_upload(settings, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{dataset_id}/validate", response_model=ValidationReport, responses=problems(404, 422, 503))
def validate_dataset(
    dataset_id: ObjectId,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    bbox_format: Annotated[BboxFormat | None, Query(description="hf only; stored for later jobs.")] = None,
) -> ValidationReport:
    """Validate the dataset again and answer the report (also stored on the dataset)."""
    dataset = service.validate(
        session, settings=settings, dataset_id=dataset_id, bbox_format=bbox_format, scope=principal.scope
    )
    session.commit()
    report = report_model(dataset.report)
    assert report is not None
    return report
