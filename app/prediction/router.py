"""POST /predict and GET /predict/stats."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api import PrincipalDep, SessionDep, SettingsDep
from app.errors import AppError, InvalidInput, PayloadTooLarge, ServiceUnavailable, UnsupportedMediaType
from app.images import IMAGE_FORMATS_TEXT, Upload
from app.limits import (
    MULTIPART_MAX_FIELD_BYTES,
    PREDICT_MAX_FORM_FIELDS,
    multipart_error,
    own_body_limit,
    too_large,
)
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU
from app.openapi import form_body, problems
from app.prediction import service
from app.prediction.schemas import PredictResponse, PredictStats
from app.schemas import ID_MAX_LENGTH, ID_PATTERN
from app.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/predict", tags=["predict"])

FILE_FIELDS = ("files", "file")


class PredictForm(BaseModel):
    """The multipart form of /predict (parsed by hand, to enforce the size limit while reading)."""

    job_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="The job whose best model predicts (or give weights_id).",
    )
    weights_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="Registered weights that predict (or give job_id).",
    )
    files: list[bytes] = Field(min_length=1, description=f"One or more images ({IMAGE_FORMATS_TEXT}).")
    conf: float = Field(default=DEFAULT_CONF, ge=0, le=1, description="Score threshold.")
    iou: float = Field(default=DEFAULT_IOU, ge=0, le=1, description="NMS IoU threshold.")
    format: Literal["json", "image"] = Field(default="json", description="image: the image with boxes drawn.")
    image_format: Literal["jpeg", "png"] = Field(default="jpeg", description="With format=image.")


# The documented form; `document_limits` adds this server's limit on the number of images.
_PREDICT_FORM = form_body(PredictForm)


def document_limits(settings: Settings) -> None:
    """State the server's `predict_max_images` in the OpenAPI document (`files.maxItems`): a client
    (or a fuzzer) that keeps to the document is never refused for sending too many images."""
    schema = _PREDICT_FORM["requestBody"]["content"]["multipart/form-data"]["schema"]
    schema["properties"]["files"]["maxItems"] = settings.predict_max_images


def _field_error(field: str, message: str) -> InvalidInput:
    return InvalidInput.field(["body", field], message, message=f"{field}: {message}")


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, failing with 413 as soon as it grows past `limit` (chunked uploads too)."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _request_too_large(f"the request is over the limit of {limit} bytes", limit)
        yield chunk


async def _read_form(request: Request, settings: Settings) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the images as multipart/form-data")
    own_body_limit(request)
    limit = settings.predict_max_request_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _request_too_large(f"the request is {length} bytes, over the limit of {limit} bytes", limit)
    parser = MultiPartParser(
        request.headers,
        _limited(request, limit),
        max_files=settings.predict_max_images,
        max_fields=PREDICT_MAX_FORM_FIELDS,
        max_part_size=MULTIPART_MAX_FIELD_BYTES,
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise _form_error(exc, settings) from exc


def _request_too_large(message: str, limit: int) -> PayloadTooLarge:
    return too_large("predict_max_request_bytes", limit, f"{message} (SGJOBS_PREDICT_MAX_REQUEST_BYTES)")


def _form_error(exc: MultiPartException, settings: Settings) -> AppError:
    """Starlette's parser names the limit it applied only in its message; ours name it in `limits`."""
    if exc.message.startswith("Too many files"):
        return too_large(
            "predict_max_images",
            settings.predict_max_images,
            f"at most {settings.predict_max_images} images per request (SGJOBS_PREDICT_MAX_IMAGES)",
        )
    if exc.message.startswith("Too many fields"):
        return too_large(
            "PREDICT_MAX_FORM_FIELDS",
            PREDICT_MAX_FORM_FIELDS,
            f"at most {PREDICT_MAX_FORM_FIELDS} form fields besides the images; send images as files "
            "(with a filename)",
        )
    if exc.message.startswith("Part exceeded maximum size"):
        return too_large(
            "MULTIPART_MAX_FIELD_BYTES",
            MULTIPART_MAX_FIELD_BYTES,
            f"a form field is over {MULTIPART_MAX_FIELD_BYTES} bytes; send images as files (with a filename)",
        )
    if "name" in exc.message and "Content-Disposition" in exc.message:
        return InvalidInput(
            'every part needs a Content-Disposition header with a name (form-data; name="files"; '
            'filename="...")'
        )
    return multipart_error(exc) or InvalidInput(f"invalid multipart body: {exc.message}")


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _field_error(name, "must be a form field, not a file")
    return value


def _object_id(form: FormData, name: str) -> str | None:
    value = _text(form, name)
    if value is None:
        return None
    # An empty field is not "left out": the document says at least one character, as here.
    if len(value) > ID_MAX_LENGTH or not re.fullmatch(ID_PATTERN, value):
        raise _field_error(name, "is not an id (letters, digits, '-' and '_')")
    return value


def _threshold(form: FormData, name: str, default: float) -> float:
    raw = _text(form, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _field_error(name, f"{raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise _field_error(name, f"{value} is not between 0 and 1")
    return value


def _image_format(form: FormData, request: Request) -> str | None:
    output = (_text(form, "format") or "json").lower()
    if output not in ("json", "image"):
        raise _field_error("format", f"{output!r} is not 'json' or 'image'")
    if output == "json":
        return None
    requested = _text(form, "image_format")
    if requested is None:
        requested = "png" if "image/png" in request.headers.get("accept", "") else "jpeg"
    requested = requested.lower().replace("jpg", "jpeg")
    if requested not in ("jpeg", "png"):
        raise _field_error("image_format", f"{requested!r} is not 'jpeg' or 'png'")
    return requested


@router.post(
    "",
    response_model=PredictResponse,
    openapi_extra=_PREDICT_FORM,
    responses={
        200: {
            "content": {"image/jpeg": {}, "image/png": {}},
            "description": "JSON, or with format=image the image",
        },
        **problems(404, 409, 413, 415, 422, 503),
    },
)
async def predict(
    request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """Detect objects in one or more images with a job's best model or registered weights.

    Multipart fields: `job_id` or `weights_id` (exactly one), `files` (repeatable), optional `conf`
    and `iou` in [0, 1],
    `format` = json (default) or image (one image only: it comes back with the boxes drawn, JPEG by
    default, PNG with `image_format=png` or `Accept: image/png`). Boxes are [x1, y1, x2, y2] in the
    original image's pixels.
    """
    form = await _read_form(request, settings)
    try:
        job_id = _object_id(form, "job_id")
        weights_id = _object_id(form, "weights_id")
        if (job_id is None) == (weights_id is None):
            raise _field_error("job_id", "give exactly one of job_id (a job's best model) or weights_id")
        conf = _threshold(form, "conf", DEFAULT_CONF)
        iou = _threshold(form, "iou", DEFAULT_IOU)
        image_format = _image_format(form, request)
        uploads: list[Upload] = []
        for key, value in form.multi_items():
            if key in FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise _field_error(key, "must be a file upload")
                name = value.filename or f"{key}[{len(uploads)}]"
                uploads.append(Upload(name=name, data=await value.read()))
        if not uploads:
            raise _field_error("files", "send at least one image")
        if image_format is not None and len(uploads) > 1:
            raise _field_error("format", "format=image takes exactly one image")
    finally:
        await form.close()
    slots = _slots(request, settings)
    if slots.used >= slots.capacity:
        raise ServiceUnavailable(
            f"{slots.used} predictions are running, the most this server takes at once "
            "(SGJOBS_PREDICT_MAX_IN_FLIGHT); try again shortly"
        )
    # Checked and taken with no await between: the count is exact on the event loop.
    slots.used += 1
    try:
        # Decoding and the inference wait block: on threads of their own (not the pool every
        # other route uses), so slow predictions never leave /healthz or GET /jobs waiting.
        result = await to_thread.run_sync(
            partial(
                service.predict,
                session,
                settings=settings,
                scope=principal.scope,
                job_id=job_id,
                weights_id=weights_id,
                uploads=uploads,
                conf=conf,
                iou=iou,
                image_format=image_format,
                lookups=request.app.state.predict_lookups,
            ),
            limiter=slots.limiter,
        )
    finally:
        slots.used -= 1
    if isinstance(result, service.Rendered):
        return Response(
            result.content,
            media_type=result.media_type,
            headers={
                "X-Detections": str(len(result.response.images[0].detections)),
                "X-Model-Cached": str(result.response.cached).lower(),
                "X-Model-Loads": str(result.response.model_loads),
            },
        )
    return Response(result.model_dump_json(), media_type="application/json")


@dataclass
class _Slots:
    """Predictions running in this API process, and the threads they wait on."""

    capacity: int
    limiter: CapacityLimiter
    used: int = 0


def _slots(request: Request, settings: Settings) -> _Slots:
    # Made on the event loop (an anyio limiter belongs to one), once per app.
    slots: _Slots | None = getattr(request.app.state, "predict_slots", None)
    if slots is None:
        capacity = settings.predict_max_in_flight
        slots = request.app.state.predict_slots = _Slots(capacity, CapacityLimiter(capacity))
    return slots


@router.get("/stats", response_model=PredictStats, responses=problems(503))
async def get_predict_stats(settings: SettingsDep, principal: PrincipalDep) -> PredictStats:
    """The inference process: running or not, checkpoints loaded so far, models held (LRU). Its
    process id and the models it holds (any tenant's) are shown to admins only."""
    stats = await run_in_threadpool(service.stats, settings=settings)
    if principal.is_admin:
        return stats
    return stats.model_copy(update={"pid": None, "cached_models": []})
