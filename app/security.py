"""Requests the API refuses before any route: unknown Host headers (DNS rebinding) and state-changing
requests from browser origins that are not allowed (cross-site requests); CORS only when configured.

A page on another site can make the user's browser send requests to a service on localhost. Bearer
keys already stop such a request from acting (a browser does not add them cross-site), and these
checks close the rest: a rebinding attack arrives with its own host name, a cross-site form post with
its own Origin.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.error_handlers import problem_response
from app.settings import ANY_INTERFACE, Settings

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Host names the API answers: loopback, the configured host, and `SGJOBS_ALLOWED_HOSTS`."""
    hosts = {*LOOPBACK_HOSTS, *(h.lower() for h in settings.allowed_hosts)}
    hosts.add(socket.gethostname().lower() if settings.host in ANY_INTERFACE else settings.host.lower())
    return frozenset(hosts)


def _host_name(host_header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """Pure ASGI middleware: 400 for a Host that is not allowed, 403 for a state-changing request
    whose Origin is neither this service nor an allowed CORS origin."""

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(hosts)
        self.any_host = "*" in self.hosts
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", ""))
        refusal: tuple[int, str, str] | None = None
        if not self.any_host and host not in self.hosts:
            refusal = (
                400,
                "host_not_allowed",
                f"this service does not answer to the host name {host!r}; an operator can add it to "
                "SGJOBS_ALLOWED_HOSTS",
            )
        origin = headers.get("origin")
        if (
            refusal is None
            and origin
            and scope["method"] not in SAFE_METHODS
            and not self._origin_allowed(origin, host)
        ):
            refusal = (
                403,
                "cross_origin",
                f"requests from the web origin {origin!r} may not change anything here; an operator "
                "can allow it in SGJOBS_CORS_ORIGINS",
            )
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, detail = refusal
        await problem_response(scope["path"], status=status, code=code, detail=detail)(scope, receive, send)

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        # The service's own pages (the docs) post from its own origin.
        return (urlsplit(origin).hostname or "") == host
