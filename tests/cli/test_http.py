"""The client's stream reader without a service (a fake transport beside the real-service tests in
test_client.py): a dropped connection is reopened with Last-Event-ID, a stream that ends before a
terminal status is reopened, and the reader stops after one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.cli import http
from app.cli.http import Api, ApiError, Config


def _message(event: str, event_id: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\r\nid: {event_id}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()


class Dropped(httpx.SyncByteStream):
    """A body that sends `chunks`, then (when `drop`) fails as a connection cut mid-stream does."""

    def __init__(self, chunks: list[bytes], *, drop: bool) -> None:
        self.chunks = chunks
        self.drop = drop

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.drop:
            raise httpx.ReadError("connection reset")


def test_a_dropped_stream_resumes_after_the_last_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "STREAM_BACKOFF_SECONDS", 0.0)
    asked: list[str | None] = []
    answers = [
        # Dropped mid-stream, after a keep-alive and two messages.
        Dropped(
            [
                b": ping\r\n\r\n",
                _message("status", "0.0.1", {"status": "running"}),
                _message("metric", "0.7.1", {"name": "x", "value": 1.0}),
            ],
            drop=True,
        ),
        # Ended by the server (its stream_max_seconds) before the job did.
        Dropped([_message("event", "3.7.1", {"message": "epoch 1"})], drop=False),
        Dropped([_message("status", "3.7.2", {"status": "succeeded"})], drop=False),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        assert request.headers["authorization"] == "Bearer k"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=answers.pop(0))

    with Api(Config("http://sgjobs.test", "k"), transport=httpx.MockTransport(handler)) as api:
        got = [(m.event, m.id) for m in api.stream("j1")]
    assert got == [("status", "0.0.1"), ("metric", "0.7.1"), ("event", "3.7.1"), ("status", "3.7.2")]
    assert asked == [None, "0.7.1", "3.7.1"]


def test_a_stream_of_a_missing_job_is_an_api_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        problem = {"status": 404, "detail": "no job 'j2'", "code": "not_found"}
        return httpx.Response(404, json=problem, headers={"content-type": "application/problem+json"})

    with Api(Config("http://sgjobs.test", "k"), transport=httpx.MockTransport(handler)) as api:
        with pytest.raises(ApiError) as caught:
            list(api.stream("j2"))
    assert caught.value.status == 404 and caught.value.message == "no job 'j2' (HTTP 404)"


def test_problems_are_formatted_with_their_extensions() -> None:
    text = http.format_problem(
        422,
        {
            "detail": "the spec is invalid",
            "errors": [{"loc": ["body", "training", "max_epochs"], "msg": "too big", "type": "x"}],
            "problems": [{"file": "train/a.json", "problem": "no images", "severity": "error"}],
            "limits": [{"limit": "upload_max_bytes", "value": 10}],
            "job_ids": ["a", "b"],
        },
    )
    assert text.splitlines() == [
        "the spec is invalid (HTTP 422)",
        "  training.max_epochs: too big",
        "  error: train/a.json: no images",
        "  limit upload_max_bytes = 10",
        "  jobs: a, b",
    ]


def test_a_field_error_that_is_the_detail_is_said_once() -> None:
    problem = {
        "detail": "body.training.max_epochs: must be at least 1",
        "errors": [{"loc": ["body", "training", "max_epochs"], "msg": "must be at least 1", "type": "x"}],
    }
    assert http.format_problem(422, problem) == "body.training.max_epochs: must be at least 1 (HTTP 422)"
