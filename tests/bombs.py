"""Typed helpers for the request-bomb tests: bad bodies generated at test time, and the checks every
refusal must pass (fast, 4xx naming the limit, the API's memory bounded, the API still answering)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import psutil

from tests.support import Service

BOUNDARY = "bomb-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
# The bar: every bad input is answered within this, and the API grows by less than this.
MAX_SECONDS = 5.0
MAX_RSS_GROWTH = 300 * 2**20
CHUNK = 64 * 1024


def api_process(service: Service) -> psutil.Process:
    """The process that listens on the service's port (the API, under `sgjobs serve`)."""
    port = urlsplit(service.base_url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"no process listens on port {port}")


def chunks(total: int, piece: bytes = b" ", size: int = CHUNK) -> Iterator[bytes]:
    """`total` bytes of `piece` repeated, lazily, `size` at a time: never all in memory."""
    block = piece * (size // len(piece))
    sent = 0
    while sent < total:
        out = block[: total - sent]
        sent += len(out)
        yield out


def part(headers: Iterable[bytes], data: bytes = b"") -> bytes:
    """One multipart part with these raw header lines."""
    return (
        b"--"
        + BOUNDARY.encode()
        + b"\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
        + data
        + b"\r\n"
    )


def end() -> bytes:
    return b"--" + BOUNDARY.encode() + b"--\r\n"


def long_header(size: int) -> Iterator[bytes]:
    """A file part whose one header line is `size` bytes long."""
    yield b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
    yield b"X-Padding: "
    yield from chunks(size, b"a")
    yield b"\r\n\r\ndata\r\n" + end()


def many_headers(count: int) -> Iterator[bytes]:
    """A file part with `count` short headers."""
    yield b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
    for i in range(count):
        yield b"X-H%d: v\r\n" % i
    yield b"\r\ndata\r\n" + end()


def many_fields(count: int, name: bytes = b"f") -> Iterator[bytes]:
    """`count` tiny form fields."""
    batch = 1000
    one = part([b'Content-Disposition: form-data; name="' + name + b'"'], b"x")
    for _ in range(0, count, batch):
        yield one * batch
    yield end()


def unnamed_part(size: int, headers: Iterable[bytes] = ()) -> Iterator[bytes]:
    """A part without a name (by default without any header) carrying `size` bytes."""
    yield b"--" + BOUNDARY.encode() + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    yield from chunks(size, b"u")
    yield b"\r\n" + end()


class _PeakRss:
    """The largest RSS of `process` while the block runs, sampled every 10 ms in a thread."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.rss = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.rss = max(self.rss, self.process.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, self.process.memory_info().rss)


@dataclass
class Refusal:
    response: httpx.Response
    seconds: float
    problem: dict[str, object]


def refused(
    service: Service,
    send: Callable[[httpx.Client], httpx.Response],
    *,
    status: int | tuple[int, ...],
    limit: str | None = None,
    mentions: str | None = None,
) -> Refusal:
    """Send a bad request; check it is refused with `status` within MAX_SECONDS as problem+json,
    naming `limit` in `limits` (413) and in its detail, or saying `mentions`; that the API grew by less
    than MAX_RSS_GROWTH; and that the API still answers /healthz."""
    api = api_process(service)
    before = api.memory_info().rss
    with _PeakRss(api) as peak:
        started = time.monotonic()
        response = send(service.client)
        seconds = time.monotonic() - started
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert seconds < MAX_SECONDS, f"refused after {seconds:.1f} s"
    assert response.headers["content-type"].startswith("application/problem+json"), response.text[:500]
    problem = response.json()
    if limit is not None:
        assert {"limit": limit} in [{"limit": x["limit"]} for x in problem.get("limits", [])], problem
    if mentions is not None:
        assert mentions in problem["detail"], problem
    growth = peak.rss - before
    assert growth < MAX_RSS_GROWTH, f"the API grew by {growth / 2**20:.0f} MB"
    assert service.client.get("/healthz").status_code == 200
    return Refusal(response, seconds, problem)
