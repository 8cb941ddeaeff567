"""Streaming a file upload to disk under a size limit: multipart (a `file` field) or the raw body.

Used by every upload route (datasets, weights): the file part is written to disk chunk by chunk as
it arrives, hashed on the way, and refused (413) as soon as it grows past the limit; small form
fields are kept in memory under the bounds of `app.limits` (parts, bytes of each field and of all of
them, headers of each part).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import AppError, InvalidInput, UnsupportedMediaType
from app.limits import (
    MULTIPART_MAX_FIELD_BYTES,
    MULTIPART_MAX_HEADER_BYTES,
    MULTIPART_MAX_PART_HEADERS,
    UPLOAD_MAX_FORM_BYTES,
    UPLOAD_MAX_PARTS,
    multipart_error,
    own_body_limit,
    too_large,
)

FILE_FIELD = "file"
# Multipart framing around the file: a Content-Length this far over the limit may still fit it.
FRAMING_ALLOWANCE = 64 * 1024


@dataclass(frozen=True)
class Received:
    """An upload written to disk: the small form fields (empty for a raw body), its size and SHA-256,
    and the file name the client gave its `file` part (None for a raw body or when it gave none)."""

    fields: dict[str, str]
    size: int
    sha256: str
    filename: str | None = None


class _Form:
    """Streaming multipart parsing: the `file` part goes to disk chunk by chunk, small fields to memory.

    Everything but the file is bounded (`app.limits`): the parser bounds each part's headers, this
    the number of parts and the bytes of the other parts, counted whether kept or not (a part
    without a name is parsed and dropped, but its bytes count).
    """

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, bytearray] = {}
        self.pending: list[bytes] = []  # file bytes parsed but not yet written
        self.file_seen = False
        self.filename: str | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: str | None = None
        self._parts = 0
        self._form_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._field,
                "on_header_value": self._value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
            },
            max_header_count=MULTIPART_MAX_PART_HEADERS,
            max_header_size=MULTIPART_MAX_HEADER_BYTES,
        )

    def _part_begin(self) -> None:
        self._headers, self._current = {}, None
        self._parts += 1
        if self._parts > UPLOAD_MAX_PARTS:
            raise too_large(
                "UPLOAD_MAX_PARTS",
                UPLOAD_MAX_PARTS,
                f"the multipart upload has more than {UPLOAD_MAX_PARTS} parts; "
                f"send the '{FILE_FIELD}' part and the few fields the route takes",
            )

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.file_seen:
                raise InvalidInput("send one file per upload")
            self.file_seen = True
            filename = params.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None
        self._current = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._current == FILE_FIELD:
            self.pending.append(bytes(data[start:end]))
            return
        self._form_bytes += end - start
        if self._form_bytes > UPLOAD_MAX_FORM_BYTES:
            raise too_large(
                "UPLOAD_MAX_FORM_BYTES",
                UPLOAD_MAX_FORM_BYTES,
                f"the parts of the upload other than '{FILE_FIELD}' are over {UPLOAD_MAX_FORM_BYTES} "
                "bytes together",
            )
        if self._current:
            value = self.fields.setdefault(self._current, bytearray())
            value += data[start:end]
            if len(value) > MULTIPART_MAX_FIELD_BYTES:
                raise too_large(
                    "MULTIPART_MAX_FIELD_BYTES",
                    MULTIPART_MAX_FIELD_BYTES,
                    f"form field {self._current!r} is over {MULTIPART_MAX_FIELD_BYTES} bytes",
                )


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    return content_type.decode("latin-1").lower()


async def receive_file(
    request: Request,
    target: Path,
    *,
    max_bytes: int,
    too_large: Callable[[], AppError],
    raw_types: Collection[str] = (),
    unsupported: str = "send the file as multipart/form-data (field 'file')",
) -> Received:
    """Stream the uploaded file to `target`: the `file` field of a multipart body, or the whole body
    when its media type is one of `raw_types`.

    Raises `too_large()` once more than `max_bytes` arrived (or the Content-Length says so before a
    byte is read), UnsupportedMediaType (message `unsupported`) for any other media type, and
    InvalidInput for a body that does not parse, has no file or is empty. The caller removes `target`.
    """
    own_body_limit(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + FRAMING_ALLOWANCE:
        raise too_large()  # refused before a byte is read
    _, params = parse_options_header(request.headers.get("content-type", ""))
    kind = media_type(request)
    form: _Form | None = None
    if kind == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidInput("multipart upload without a boundary")
        form = _Form(boundary)
    elif kind not in raw_types:
        raise UnsupportedMediaType(unsupported)
    written = 0
    digest = hashlib.sha256()
    async with await anyio.open_file(target, "wb") as out:
        async for chunk in request.stream():
            pieces = [chunk]
            if form is not None:
                try:
                    form.parser.write(chunk)
                except AppError:
                    raise
                except Exception as exc:  # python-multipart's parse errors, its header limits among them
                    raise multipart_error(exc) or InvalidInput(
                        f"the multipart body does not parse: {exc}"
                    ) from exc
                pieces, form.pending = form.pending, []
            for piece in pieces:
                written += len(piece)
                if written > max_bytes:
                    raise too_large()
                digest.update(piece)
                await out.write(piece)
    if form is None:
        if written == 0:
            raise InvalidInput("the upload is empty")
        return Received(fields={}, size=written, sha256=digest.hexdigest())
    form.parser.finalize()
    if not form.file_seen:
        raise InvalidInput(f"the multipart upload has no '{FILE_FIELD}' field")
    fields = {k: v.decode("utf-8", "replace") for k, v in form.fields.items()}
    return Received(fields=fields, size=written, sha256=digest.hexdigest(), filename=form.filename)
