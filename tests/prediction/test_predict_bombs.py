"""Bombs against POST /predict through the real API: images that decode to gigabytes, formats the
service does not read, endless part headers, a flood of fields, unnamed parts. Each is refused
within seconds with a 4xx naming its limit, before any model is looked up (no trained job needed),
the API's memory stays bounded, and the API answers the next request."""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import cache

import httpx
import pytest
from PIL import Image

from app.images import IMAGE_FORMATS_TEXT
from app.limits import MULTIPART_MAX_FIELD_BYTES, PREDICT_MAX_FORM_FIELDS
from app.settings import Settings
from tests.bombs import BOUNDARY, MULTIPART, chunks, end, part, refused
from tests.support import Service

pytestmark = pytest.mark.backends("sqlite")

NO_JOB = "0" * 32  # the images are refused before the job is looked up
MAX_IMAGES = Settings.model_fields["predict_max_images"].default
MAX_TOTAL_PIXELS = Settings.model_fields["predict_max_total_pixels"].default


@cache
def solid_png(side: int) -> bytes:
    """A side x side PNG of one colour: ~100 KB for 7000 x 7000, 147 MB once decoded to RGB."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def image_in(fmt: str) -> bytes:
    """A small image in PIL format `fmt`."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(out, format=fmt)
    return out.getvalue()


def _files(images: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in images]


def test_32_solid_7000px_pngs_are_refused_from_their_headers(service: Service) -> None:
    png = solid_png(7000)
    assert len(png) < 2**20  # a few MB for the whole request
    images = [(f"{i}.png", png) for i in range(MAX_IMAGES)]

    def send(client: httpx.Client) -> httpx.Response:
        return client.post("/predict", data={"job_id": NO_JOB}, files=_files(images))

    refusal = refused(
        service,
        send,
        status=413,
        limit="predict_max_total_pixels",
        mentions="SGJOBS_PREDICT_MAX_TOTAL_PIXELS",
    )
    assert refusal.problem["limits"] == [{"limit": "predict_max_total_pixels", "value": MAX_TOTAL_PIXELS}]
    assert str(MAX_IMAGES * 7000 * 7000) in str(refusal.problem["detail"])


def test_images_under_the_total_are_not_refused_for_it(service: Service) -> None:
    images = [("a.png", solid_png(7000)), ("b.png", image_in("JPEG"))]
    response = service.client.post("/predict", data={"job_id": NO_JOB}, files=_files(images))
    assert response.status_code == 404, response.text  # past the image checks, to the unknown job


@pytest.mark.parametrize("fmt", ["GIF", "ICO", "PPM", "TGA", "EPS", "PCX"])
def test_formats_the_service_does_not_read_are_415_naming_those_it_does(service: Service, fmt: str) -> None:
    data = image_in(fmt)

    def send(client: httpx.Client) -> httpx.Response:
        return client.post(
            "/predict",
            data={"job_id": NO_JOB},
            files=_files([("ok.png", image_in("PNG")), (f"x.{fmt}", data)]),
        )

    refusal = refused(service, send, status=415, mentions=IMAGE_FORMATS_TEXT)
    assert f"x.{fmt}" in str(refusal.problem["detail"])


def _post(client: httpx.Client, body: Iterator[bytes] | bytes) -> httpx.Response:
    return client.post("/predict", content=body, headers={"content-type": MULTIPART})


def _file_part_start() -> bytes:
    return (
        b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
    )


def test_a_megabytes_long_part_header_is_refused(service: Service) -> None:
    def body() -> Iterator[bytes]:
        yield _file_part_start() + b"X-Padding: "
        yield from chunks(8 * 2**20, b"a")
        yield b"\r\n\r\nx\r\n" + end()

    refused(service, lambda c: _post(c, body()), status=413, limit="MULTIPART_MAX_HEADER_BYTES")


def test_thousands_of_part_headers_are_refused(service: Service) -> None:
    def body() -> Iterator[bytes]:
        yield _file_part_start()
        yield b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
        yield b"\r\nx\r\n" + end()

    refused(service, lambda c: _post(c, body()), status=413, limit="MULTIPART_MAX_PART_HEADERS")


def test_a_million_fields_are_refused(service: Service) -> None:
    def body() -> Iterator[bytes]:
        one = part([b'Content-Disposition: form-data; name="conf"'], b"0.5")
        for _ in range(1000):
            yield one * 1000
        yield end()

    refusal = refused(service, lambda c: _post(c, body()), status=413, limit="PREDICT_MAX_FORM_FIELDS")
    assert str(PREDICT_MAX_FORM_FIELDS) in str(refusal.problem["detail"])


def test_a_long_field_is_refused(service: Service) -> None:
    body = part([b'Content-Disposition: form-data; name="job_id"'], b"x" * 8 * 2**20) + end()
    refusal = refused(service, lambda c: _post(c, body), status=413, limit="MULTIPART_MAX_FIELD_BYTES")
    assert str(MULTIPART_MAX_FIELD_BYTES) in str(refusal.problem["detail"])


@pytest.mark.parametrize(
    "headers",
    [(), (b"Content-Type: text/plain",), (b"Content-Disposition: form-data",)],
    ids=["no-headers", "no-disposition", "no-name"],
)
def test_unnamed_parts_are_refused_before_their_data(service: Service, headers: tuple[bytes, ...]) -> None:
    def body() -> Iterator[bytes]:
        yield b"--" + BOUNDARY.encode() + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        yield from chunks(32 * 2**20, b"u")
        yield b"\r\n" + end()

    refused(service, lambda c: _post(c, body()), status=422, mentions="Content-Disposition")


def test_the_request_limit_is_named(service: Service) -> None:
    def body() -> Iterator[bytes]:
        yield _file_part_start() + b"\r\n"
        yield from chunks(2 * 2**30, b"p")  # chunked: counted as it arrives

    def send(client: httpx.Client) -> httpx.Response:
        return _post(client, body())

    refused(service, send, status=413, limit="predict_max_request_bytes")
