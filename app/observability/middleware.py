"""Request latency by route template: a pure ASGI middleware around the whole application."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.metrics import REQUEST_SECONDS

# A method outside these is counted as `other`: a client's made-up methods never make new series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
EVENT_STREAM = "text/event-stream"


def route_template(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The path template of the route that answered (`/jobs/{job_id}`, never the request's path,
    whose ids would make a series per object); `unmatched` when no route did.

    The router records an API route in the scope; a plain Starlette route of `routes` (the docs,
    /openapi.json) only its endpoint.
    """
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    if route is None and endpoint is not None:
        route = next((r for r in routes if getattr(r, "endpoint", None) is endpoint), None)
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED


class RequestMetrics:
    """Observes `sgjobs_http_request_duration_seconds` for every HTTP request: from its arrival to the
    end of its answer (for a stream of Server-Sent Events, to its start: a stream lasts as long as
    its job, which says nothing about how fast the API answers), labelled with the route template
    the router matched (recorded in the scope), the method and the status class. An exception that
    escapes the application is a 5xx.

    `routes`: the application's routes (its live list), where a plain Starlette route's template is
    found."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered: float | None = None
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            method = scope["method"] if scope["method"] in METHODS else "other"
            REQUEST_SECONDS.labels(route_template(scope, self.routes), method, f"{status // 100}xx").observe(
                (answered or time.perf_counter()) - started
            )

        async def recording_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if _content_type(message).startswith(EVENT_STREAM):
                    answered = time.perf_counter()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Observed before the last byte leaves: a client that scrapes right after its answer
                # arrived must find it counted (after `send` returns, the client may be faster).
                record()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            record()


def _content_type(start: Message) -> str:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return str(value.decode("latin-1")).lower()
    return ""
