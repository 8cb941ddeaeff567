"""A real HTTP receiver for webhook messages: a threaded http.server on a free port of 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request as it arrived: the raw body, and the headers with lower-case names."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Records every request by path and answers each path with its scripted status codes in
    order (then 200). A 3xx answer carries `Location: /<path>-redirected`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[str, list[Received]] = defaultdict(list)
        self._scripts: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.lstrip("/")
                status = receiver._record(path, {k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"/{path}-redirected")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self._received[path].append(Received(path, headers, body))
            script = self._scripts.get(path) or []
            return script.pop(0) if script else 200

    def url(self, path: str, *, answers: list[int] | None = None) -> str:
        """The URL of a fresh path, answered with `answers` (then 200)."""
        with self._lock:
            self._scripts[path] = list(answers or [])
        return f"http://127.0.0.1:{self.port}/{path}"

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return list(self._received[path])

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        """At least `count` requests to `path`; fails with what did arrive on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.received(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(self.received(path))} of {count} requests arrived")
            time.sleep(0.05)
        return self.received(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
