"""Request bombs against the real API (`app.limits`, `app.uploads`): huge JSON bodies, endless
multipart headers, a million fields, data in unnamed parts. Each is refused within seconds with a
4xx naming its limit, the API's memory stays bounded, and the API answers the next request."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.limits import (
    MULTIPART_MAX_FIELD_BYTES,
    MULTIPART_MAX_HEADER_BYTES,
    UPLOAD_MAX_FORM_BYTES,
    UPLOAD_MAX_PARTS,
)
from app.settings import Settings
from tests.bombs import MULTIPART, chunks, long_header, many_fields, many_headers, part, refused, unnamed_part
from tests.support import Service

pytestmark = pytest.mark.backends("sqlite")

GB = 2**30
JSON_LIMIT = Settings.model_fields["json_max_bytes"].default
UPLOAD_ROUTES = ("/datasets", "/weights")


def _json_body(total: int) -> Iterator[bytes]:
    """A JSON object whose one string is `total` bytes long, lazily."""
    yield b'{"name": "'
    yield from chunks(total, b"a")
    yield b'"}'


def test_a_2gb_json_body_is_refused_by_its_content_length(service: Service) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        headers = {"content-type": "application/json", "content-length": str(2 * GB + 12)}
        return client.post("/jobs", content=_json_body(2 * GB), headers=headers)

    refusal = refused(service, send, status=413, limit="json_max_bytes", mentions="SGJOBS_JSON_MAX_BYTES")
    assert refusal.problem["limits"] == [{"limit": "json_max_bytes", "value": JSON_LIMIT}]
    assert refusal.problem["code"] == "payload_too_large" and refusal.problem["instance"] == "/jobs"


def test_a_chunked_json_body_is_refused_once_it_passes_the_limit(service: Service) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        # No Content-Length: a generator body goes out chunked.
        return client.post("/jobs", content=_json_body(2 * GB), headers={"content-type": "application/json"})

    refused(service, send, status=413, limit="json_max_bytes")


@pytest.mark.parametrize("content_type", ["text/plain", "application/zip", MULTIPART, None])
def test_any_body_a_json_route_would_read_is_limited(service: Service, content_type: str | None) -> None:
    """FastAPI reads the whole body of a JSON route whatever its type: the limit holds for all."""

    def send(client: httpx.Client) -> httpx.Response:
        headers = {"content-type": content_type} if content_type else {}
        return client.post("/jobs", content=_json_body(64 * 2**20), headers=headers)

    refused(service, send, status=413, limit="json_max_bytes")


def test_a_json_body_under_the_limit_still_reaches_the_route(service: Service) -> None:
    response = service.client.post("/jobs", json={"padding": "a" * (JSON_LIMIT // 2)})
    assert response.status_code == 422, response.text  # the route's own validation, not the limit


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_a_megabytes_long_part_header_is_refused(service: Service, route: str) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(route, content=long_header(8 * 2**20), headers={"content-type": MULTIPART})

    refused(
        service,
        send,
        status=413,
        limit="MULTIPART_MAX_HEADER_BYTES",
        mentions=str(MULTIPART_MAX_HEADER_BYTES),
    )


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_thousands_of_part_headers_are_refused(service: Service, route: str) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(route, content=many_headers(100_000), headers={"content-type": MULTIPART})

    refused(service, send, status=413, limit="MULTIPART_MAX_PART_HEADERS")


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_a_million_fields_are_refused(service: Service, route: str) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(route, content=many_fields(1_000_000), headers={"content-type": MULTIPART})

    refused(service, send, status=413, limit="UPLOAD_MAX_PARTS", mentions=str(UPLOAD_MAX_PARTS))


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [(), (b"Content-Type: text/plain",), (b"Content-Disposition: form-data",)],
    ids=["no-headers", "no-disposition", "no-name"],
)
def test_data_in_unnamed_parts_counts_against_the_form_limit(
    service: Service, route: str, headers: tuple[bytes, ...]
) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(
            route, content=unnamed_part(64 * 2**20, headers), headers={"content-type": MULTIPART}
        )

    refused(service, send, status=413, limit="UPLOAD_MAX_FORM_BYTES", mentions=str(UPLOAD_MAX_FORM_BYTES))


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_many_named_fields_count_against_the_form_limit(service: Service, route: str) -> None:
    """Fields each under their own limit, but together over the form's."""
    body = b"".join(
        part([b'Content-Disposition: form-data; name="f%d"' % i], b"x" * MULTIPART_MAX_FIELD_BYTES)
        for i in range(UPLOAD_MAX_PARTS - 1)
    )

    def send(client: httpx.Client) -> httpx.Response:
        return client.post(route, content=body, headers={"content-type": MULTIPART})

    refused(service, send, status=413, limit="UPLOAD_MAX_FORM_BYTES")


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
def test_one_long_field_is_refused(service: Service, route: str) -> None:
    body = part([b'Content-Disposition: form-data; name="name"'], b"x" * (MULTIPART_MAX_FIELD_BYTES + 1))

    def send(client: httpx.Client) -> httpx.Response:
        return client.post(route, content=body, headers={"content-type": MULTIPART})

    refused(service, send, status=413, limit="MULTIPART_MAX_FIELD_BYTES")
