"""Limits on what a request may send, in one place: the JSON body limit (`JsonBodyLimit`, a pure ASGI
middleware) and the bounds of every multipart body (`POST /datasets`, `POST /weights`, `/predict`).

A body the API reads into memory (JSON, or anything a route without its own limit is sent) is
refused with 413 past `SGJOBS_JSON_MAX_BYTES`: at once when its Content-Length says so, else as it
arrives. Routes that stream an upload under a limit of their own (`app.uploads.receive_file`,
`/predict`) say so with `own_body_limit` before they read, and are left alone.

Multipart bodies: python-multipart bounds the headers of each part (`MULTIPART_MAX_PART_HEADERS`
headers of at most `MULTIPART_MAX_HEADER_BYTES` bytes each); the readers bound the number of parts
and the bytes of every part that is not the file, unnamed parts included.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.error_handlers import error_response
from app.errors import AppError, PayloadTooLarge, broken_limit

# Headers of one multipart part. python-multipart's own defaults: Starlette's parser (`/predict`)
# cannot be given others, and `app.uploads` passes these to the parser explicitly. A real part has
# two or three short headers (Content-Disposition, Content-Type).
MULTIPART_MAX_PART_HEADERS = DEFAULT_MAX_HEADER_COUNT
MULTIPART_MAX_HEADER_BYTES = DEFAULT_MAX_HEADER_SIZE
# The bytes of one form field (a name, an id, a threshold): every part that is not a file.
MULTIPART_MAX_FIELD_BYTES = 1024
# Parts of an upload (`POST /datasets`, `POST /weights`): the file and a few small fields.
UPLOAD_MAX_PARTS = 16
# Every byte of an upload that is not the file (its other fields and any unnamed part) together.
UPLOAD_MAX_FORM_BYTES = 8 * 1024
# Fields of a /predict form that are not images (job_id, weights_id, conf, iou, format, image_format).
PREDICT_MAX_FORM_FIELDS = 16

# The scope key a route sets (`own_body_limit`) when it reads its body under a limit of its own.
_OWN_LIMIT = "sgjobs.own_body_limit"


def too_large(limit: str, value: float, message: str) -> PayloadTooLarge:
    """413 naming the broken limit (a setting's or a constant's name) and its value."""
    return PayloadTooLarge(message, details=broken_limit(limit, value))


def multipart_error(exc: BaseException) -> AppError | None:
    """The 413 for a python-multipart error that is a header limit (the error or its cause), else None.

    python-multipart says which limit only in its message.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, FormParserError):
        cause = cause.__cause__
    message = str(cause).lower() if cause is not None else ""
    if "header count" in message:
        return too_large(
            "MULTIPART_MAX_PART_HEADERS",
            MULTIPART_MAX_PART_HEADERS,
            f"a multipart part has more than {MULTIPART_MAX_PART_HEADERS} headers; "
            "send each part with only Content-Disposition and Content-Type",
        )
    if "header size" in message:
        return too_large(
            "MULTIPART_MAX_HEADER_BYTES",
            MULTIPART_MAX_HEADER_BYTES,
            f"a multipart part has a header line over {MULTIPART_MAX_HEADER_BYTES} bytes; "
            "send each part with only Content-Disposition and Content-Type",
        )
    return None


def own_body_limit(request: Request) -> None:
    """Tell `JsonBodyLimit` that this route reads its body under a limit of its own; call before reading."""
    request.scope[_OWN_LIMIT] = True


def json_too_large(max_bytes: int) -> PayloadTooLarge:
    return too_large(
        "json_max_bytes",
        max_bytes,
        f"the request body is over the limit of {max_bytes} bytes (SGJOBS_JSON_MAX_BYTES); "
        "upload files with the upload routes",
    )


class JsonBodyLimit:
    """Refuse (413) a body over `max_bytes` (the `json_max_bytes` setting) that a route reads without
    a limit of its own.

    Checked when the route first reads its body, so that the route has had its say (`own_body_limit`):
    a Content-Length over the limit is refused before a byte is read, a chunked body as soon as it
    passes the limit. Whatever the route answers to the body it could not read is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if scope.get(_OWN_LIMIT):
                return await receive()
            if received == 0 and _content_length(scope) > limit:
                refused = True
                raise json_too_large(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise json_too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused and not started:
                return  # the route's answer to a body it could not read: the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused or started:
                raise
        if refused and not started:
            await error_response(Request(scope), json_too_large(limit))(scope, receive, send)


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0
