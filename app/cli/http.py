"""The client CLI's link to the service: HTTP only (httpx), typed errors, and the live feed.

Nothing here touches the service's database or its training code: the client runs on a laptop
against a remote service. `SGJOBS_URL` and `SGJOBS_API_KEY` say where and who; by default the
local service (`SGJOBS_PORT`) and its admin key (`SGJOBS_ADMIN_KEY`, else `$SGJOBS_HOME/admin.key`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.jobs.states import FINISHED_STATUSES
from app.settings import Settings
from app.sse import messages as sse_messages

URL_ENV = "SGJOBS_URL"
API_KEY_ENV = "SGJOBS_API_KEY"
# Ordinary requests; an ONNX export answers only when it is done (the server allows it minutes).
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
EXPORT_TIMEOUT = httpx.Timeout(900.0, connect=10.0)
# A stream sends keep-alive comments (every 15 s by default): silence this long is a dead connection.
STREAM_READ_TIMEOUT = 90.0
# A dropped stream is reopened (with Last-Event-ID) this many times in a row before giving up.
STREAM_RETRIES = 8
# The first pause before reopening a dropped stream; it doubles with each failure in a row.
STREAM_BACKOFF_SECONDS = 0.5
CHUNK_BYTES = 1 << 20


class CliError(Exception):
    """Something the user must fix or know, said in one message (exit code `exit_code`)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiError(CliError):
    """An error answer of the API: its RFC 9457 problem (or whatever body came)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(format_problem(status, problem))


def format_problem(status: int, problem: dict[str, Any]) -> str:
    """The problem's `detail` and its extension members (field errors, dataset problems, limits,
    jobs in the way), one per line."""
    detail = str(problem.get("detail") or problem.get("title") or "error")
    lines = [f"{detail} (HTTP {status})"]
    for error in problem.get("errors") or []:
        if str(error.get("msg")) in detail:
            continue  # a single field error is the detail already
        where = ".".join(str(part) for part in error.get("loc", []) if part != "body")
        lines.append(f"  {where}: {error.get('msg')}")
    for item in problem.get("problems") or []:
        lines.append(f"  {item.get('severity', 'error')}: {item.get('file')}: {item.get('problem')}")
    for limit in problem.get("limits") or []:
        lines.append(f"  limit {limit.get('limit')} = {limit.get('value')}")
    if problem.get("job_ids"):
        lines.append(f"  jobs: {', '.join(problem['job_ids'])}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Config:
    """Where the service is and the key to send."""

    url: str
    api_key: str | None

    @classmethod
    def from_env(cls) -> Config:
        url = os.environ.get(URL_ENV)
        key = os.environ.get(API_KEY_ENV) or None
        if url and key:
            return cls(url.rstrip("/"), key)
        try:
            settings = Settings()
        except ValueError as exc:  # pydantic's ValidationError: a malformed SGJOBS_* variable
            raise CliError(f"the SGJOBS_* settings are invalid: {exc}") from exc
        if not url:
            url = f"http://127.0.0.1:{settings.port}"
        if key is None and settings.admin_key is not None:
            key = settings.admin_key.get_secret_value()
        if key is None:
            key = _read_key(settings.admin_key_file)
        return cls(url.rstrip("/"), key)


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Message:
    """One Server-Sent Events message of a job's stream; `data` is its JSON document."""

    event: str
    id: str | None
    data: Any

    def as_json(self) -> dict[str, Any]:
        return {"event": self.event, "id": self.id, "data": self.data}


class Api:
    """The service's HTTP API, with errors turned into `ApiError`/`CliError`."""

    def __init__(self, config: Config, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.Client(base_url=config.url, headers=headers, timeout=TIMEOUT, transport=transport)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unreachable(self, exc: httpx.TransportError) -> CliError:
        if isinstance(exc, httpx.ConnectError):
            return CliError(
                f"cannot connect to the sgjobs service at {self.config.url} ({exc}); is it running? "
                f"Set {URL_ENV} to its address."
            )
        return CliError(f"the sgjobs service at {self.config.url} did not answer: {exc!r}")

    def check(self, response: httpx.Response) -> httpx.Response:
        """`response`, or the `ApiError` it carries (a clear word on a missing or refused key)."""
        if response.status_code < 400:
            return response
        response.read()
        try:
            problem = response.json()
            if not isinstance(problem, dict):
                raise ValueError(problem)
        except ValueError:
            problem = {"detail": response.text.strip()[:500] or response.reason_phrase}
        if response.status_code == 401:
            if self.config.api_key is None:
                problem["detail"] = (
                    f"{problem.get('detail')}: no API key; set {API_KEY_ENV} "
                    "(on the service's machine the admin key in $SGJOBS_HOME/admin.key is used)"
                )
            else:
                problem["detail"] = f"{problem.get('detail')}: check {API_KEY_ENV}"
        raise ApiError(response.status_code, problem)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self.check(response)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def download(
        self,
        path: str,
        target: Path,
        *,
        on_start: Callable[[int | None], None],
        on_chunk: Callable[[int], None],
    ) -> str:
        """Stream `path` into `target` (through a temporary file beside it); returns its SHA-256."""
        import hashlib

        digest = hashlib.sha256()
        partial = target.with_name(target.name + ".part")
        try:
            with self.client.stream("GET", path) as response:
                self.check(response)
                length = response.headers.get("content-length")
                on_start(int(length) if length and length.isdigit() else None)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        on_chunk(len(chunk))
            partial.replace(target)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            partial.unlink(missing_ok=True)
        return digest.hexdigest()

    def stream(self, job_id: str, last_id: str | None = None) -> Iterator[Message]:
        """The job's live feed (`GET /jobs/{id}/stream`) until the job has finished: a dropped or
        expired connection is reopened with `Last-Event-ID`, so nothing is lost or repeated."""
        failures = 0
        timeout = httpx.Timeout(TIMEOUT.connect, read=STREAM_READ_TIMEOUT, write=TIMEOUT.write, pool=None)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            finished = received = False
            try:
                with self.client.stream(
                    "GET", f"/jobs/{job_id}/stream", headers=headers, timeout=timeout
                ) as response:
                    self.check(response)
                    for sse in sse_messages(response.iter_lines()):
                        if sse.comment is not None:
                            continue  # a keep-alive
                        failures, received = 0, True
                        if sse.id:
                            last_id = sse.id
                        message = Message(sse.event, sse.id, sse.json())
                        if message.event == "status":
                            finished = message.data.get("status") in FINISHED_STATUSES
                        yield message
            except httpx.TransportError as exc:
                failures += 1
                if failures > STREAM_RETRIES:
                    raise self._unreachable(exc) from exc
                time.sleep(min(STREAM_BACKOFF_SECONDS * 2 ** (failures - 1), 30.0))
                continue
            if finished:
                return
            if not received:
                time.sleep(1.0)
            # The server ends a stream after its stream_max_seconds (or when the job was deleted,
            # which the next connection answers with 404): reconnect where it stopped.
