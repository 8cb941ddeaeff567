"""RequestMetrics on its own (a pure ASGI middleware): what no well-behaved route of the real API does."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Receive, Scope, Send

from app.observability.metrics import REGISTRY
from app.observability.middleware import RequestMetrics

COUNT = "sgjobs_http_request_duration_seconds_count"


def _count(route: str, method: str, status: str) -> float:
    return REGISTRY.get_sample_value(COUNT, {"route": route, "method": method, "status": status}) or 0.0


def _scope(method: str, route: object | None = None) -> Scope:
    return {"type": "http", "method": method, "path": "/x/1", "headers": [], "route": route}


class _Route:
    path_format = "/x/{x_id}"


async def _crash(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _receive() -> dict[str, object]:
    return {"type": "http.request", "body": b""}


async def _send(message: object) -> None:
    return None


def test_an_exception_that_escapes_is_a_5xx() -> None:
    before = _count("/x/{x_id}", "GET", "5xx")
    with pytest.raises(RuntimeError):
        asyncio.run(RequestMetrics(_crash)(_scope("GET", _Route()), _receive, _send))
    assert _count("/x/{x_id}", "GET", "5xx") == before + 1


def test_made_up_methods_share_one_series() -> None:
    before = _count("/x/{x_id}", "other", "2xx")
    for method in ("FOO", "BAR"):
        asyncio.run(RequestMetrics(_ok)(_scope(method, _Route()), _receive, _send))
    assert _count("/x/{x_id}", "other", "2xx") == before + 2
    assert _count("/x/{x_id}", "FOO", "2xx") == 0


def _sum(route: str) -> float:
    labels = {"route": route, "method": "GET", "status": "2xx"}
    return REGISTRY.get_sample_value("sgjobs_http_request_duration_seconds_sum", labels) or 0.0


class _StreamRoute:
    path_format = "/s/{s_id}"


async def _stream(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await asyncio.sleep(0.5)  # a stream stays open as long as its job runs
    await send({"type": "http.response.body", "body": b"data: x\n\n"})


def test_a_stream_counts_until_it_starts_not_until_it_ends() -> None:
    before = _sum("/s/{s_id}")
    asyncio.run(RequestMetrics(_stream)(_scope("GET", _StreamRoute()), _receive, _send))
    assert 0 < _sum("/s/{s_id}") - before < 0.25
