"""GET /jobs/{id}/stream (Server-Sent Events) and GET /jobs/{id}/metrics?max_points=, through real
HTTP against `sgjobs serve`.

Most tests drive a job inserted as running, writing its rows straight through `app.jobs.lifecycle`
as the training process does (fast and exact); one per backend follows a real training.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.db import session_scope
from app.jobs import lifecycle, stream
from app.jobs.models import JobStatus
from app.ml.types import MetricPoint
from app.settings import Settings
from app.sse import Message, amessages, messages
from tests.auth.helpers import client_for, make_key
from tests.support import Service, insert_job, make_shapes, tiny_spec

ROW_MESSAGES = ("metric", "event", "superseded")


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "stream-shapes", splits=(("train", 8), ("valid", 4)))
    return "stream-shapes"


@pytest.fixture(scope="module")
def member(service: Service, service_settings: Settings) -> Iterator[httpx.Client]:
    """A member of the default tenant (the tenant of `insert_job`'s jobs): sees redacted answers."""
    with client_for(service, make_key(service_settings, "default")) as client:
        yield client


def _id(message: Message) -> tuple[int, ...]:
    assert message.id is not None, message
    return tuple(int(part) for part in message.id.split("."))


class Stream:
    """An open stream: its messages in order, read with a deadline (keep-alives wake the reader)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._messages = messages(lines)
        self.received: list[Message] = []
        self.comments: list[str] = []
        self.ended = False

    def read_until(self, stop: Callable[[Message], bool], timeout: float = 60) -> list[Message]:
        deadline = time.monotonic() + timeout
        start = len(self.received)
        for message in self._messages:
            if message.comment is not None:
                self.comments.append(message.comment)
            else:
                self.received.append(message)
                if stop(message):
                    return self.received[start:]
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen in {timeout} s; got {self.received[start:]}")
        self.ended = True
        return self.received[start:]

    def next(self) -> Message:
        """The next message or comment, whichever comes."""
        return next(self._messages)

    def read_to_end(self, timeout: float = 60) -> list[Message]:
        got = self.read_until(lambda m: False, timeout)
        assert self.ended
        return got


@contextmanager
def open_stream(client: httpx.Client, job_id: str, **kwargs: Any) -> Iterator[Stream]:
    with client.stream("GET", f"/jobs/{job_id}/stream", **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response.iter_lines())


def _write(settings: Settings, job_id: str, *points: MetricPoint, event: str | None = None) -> None:
    with session_scope(settings.database_url) as session:
        lifecycle.add_metrics(session, job_id=job_id, points=list(points))
        if event is not None:
            lifecycle.add_event(session, job_id=job_id, message=event)


def _point(name: str, step: int, value: float, epoch: int = 0) -> MetricPoint:
    return MetricPoint(name, value, epoch=epoch, step=step)


def _rows(received: list[Message], *names: str) -> list[Any]:
    return [m.json() for m in received if m.event in names]


def _assert_ids_increase(received: list[Message]) -> None:
    ids = [_id(m) for m in received]
    for before, after in zip(ids, ids[1:], strict=False):
        # Each message raises exactly one part: strictly increasing, compared as tuples too.
        assert all(b <= a for b, a in zip(before, after, strict=True)) and before != after, (before, after)


def _without_eta(job: dict[str, Any]) -> dict[str, Any]:
    return {**job, "progress": {**job["progress"], "eta_seconds": None}}


def test_rows_arrive_as_written_and_a_reconnect_resumes_exactly(
    service: Service, service_settings: Settings, dataset: str, member: httpx.Client
) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    home = service_settings.home
    with open_stream(member, job_id) as stream:
        first = stream.read_until(lambda m: m.event == "event")  # the history: the "queued" event
        assert [m.event for m in first] == ["progress", "status", "event"]
        assert first[1].json()["status"] == "running"
        _write(
            service_settings,
            job_id,
            _point("Batch_loss", 0, 3.0),
            _point("Batch_lr", 0, 0.1),
            # A host path, as the worker writes them: a member sees it redacted, as from GET /events.
            event=f"checkpoint written to {home}/jobs/{job_id}/ckpt.pth (pid 4242)",
        )
        with session_scope(service_settings.database_url) as session:
            progress = lifecycle.Progress(epoch=0, batch=1, batches_per_epoch=4)
            reported = lifecycle.report(
                session, job_id=job_id, attempt=1, lease_seconds=60, progress=progress
            )
            assert reported is False  # held, not cancelled
        live = stream.read_until(lambda m: m.event == "progress")
        assert [m.event for m in live if m.event in ROW_MESSAGES] == ["metric", "metric", "event"]
        assert live[-1].json()["batch"] == 1
    # Written while no stream was open, then resumed from the last id received.
    _write(service_settings, job_id, _point("Batch_loss", 1, 2.0), event="written while away")
    last = stream.received[-1].id
    with open_stream(member, job_id, headers={"Last-Event-ID": last}) as resumed:
        again = resumed.read_until(lambda m: m.event == "event")
        assert [m.event for m in again] == ["progress", "status", "metric", "event"]
        _write(service_settings, job_id, _point("Batch_loss", 2, 1.0))
        with session_scope(service_settings.database_url) as session:
            assert lifecycle.finish(session, job_id=job_id, status=JobStatus.succeeded)
        rest = resumed.read_to_end()
    assert rest[-1].event == "status" and rest[-1].json()["status"] == "succeeded"
    received = stream.received + resumed.received
    _assert_ids_increase(received)
    # Exactly what the GET routes show this member: no gap, no duplicate, the same redaction.
    metrics = member.get(f"/jobs/{job_id}/metrics").json()["items"]
    events = member.get(f"/jobs/{job_id}/events").json()["items"]
    assert _rows(received, "metric") == metrics and len(metrics) == 4
    assert _rows(received, "event") == events and len(events) == 4
    assert str(home) not in resumed.received[0].data + str(events) and "<jobs>/" in str(events)
    assert "4242" not in str(events)
    assert rest[-1].json() == member.get(f"/jobs/{job_id}").json()
    # A stream of a finished job from its end: where it is, and the end.
    with open_stream(member, job_id, params={"last_event_id": rest[-1].id}) as ended:
        assert [m.event for m in ended.read_to_end()] == ["progress", "status"]
    # The header wins over the query (EventSource keeps its first URL and sends newer ids).
    with open_stream(
        member, job_id, params={"last_event_id": "0.0.0"}, headers={"Last-Event-ID": last}
    ) as both:
        assert len(_rows(both.read_to_end(), "metric")) == 2


def test_an_admin_gets_the_unredacted_forms(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = insert_job(service_settings, dataset, status="succeeded")
    _write(service_settings, job_id, event=f"see {service_settings.home}/x/y.log")
    with open_stream(service.client, job_id) as stream:
        received = stream.read_to_end()
    assert _rows(received, "event") == service.events(job_id)
    assert str(service_settings.home) in received[-2].data
    assert _without_eta(received[-1].json()) == _without_eta(service.job(job_id))


def test_a_superseded_epoch_is_announced(service: Service, service_settings: Settings, dataset: str) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    _write(service_settings, job_id, *(_point("Valid_mAP@0.50", e, 0.1 * e, epoch=e) for e in range(3)))
    with open_stream(service.client, job_id) as stream:
        stream.read_until(lambda m: m.event == "metric" and m.json()["epoch"] == 2)
        # An attempt resumes at epoch 1: the points of epochs 1 and 2 are replaced.
        with session_scope(service_settings.database_url) as session:
            lifecycle.supersede_from_epoch(session, job_id=job_id, epoch=1, metric_to_watch="mAP@0.50")
        notice = stream.read_until(lambda m: m.event == "superseded")[-1].json()
        assert notice["kind"] == "superseded" and notice["data"] == {"superseded_from_epoch": 1, "deleted": 2}
        _write(service_settings, job_id, _point("Valid_mAP@0.50", 1, 0.5, epoch=1))
        stream.read_until(lambda m: m.event == "metric" and m.json()["value"] == 0.5)
    # Applied as the notice says, the points received are the series as stored.
    received = stream.received
    at = next(i for i, m in enumerate(received) if m.event == "superseded")
    kept = [p for p in _rows(received[:at], "metric") if p["epoch"] < 1] + _rows(received[at:], "metric")
    assert kept == service.metrics(job_id)
    assert _rows(received, "event", "superseded") == service.events(job_id)


def test_quiet_streams_get_keep_alive_comments(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    with open_stream(service.client, job_id) as stream:
        stream.read_until(lambda m: m.event == "event")
        # Nothing is written: what comes next can only be a keep-alive (every second in tests).
        quiet = stream.next()
    assert quiet.comment is not None and quiet.comment.startswith("ping"), quiet


def test_unknown_and_other_tenants_jobs_are_404_before_streaming(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    with client_for(service, make_key(service_settings, "stream-other")) as other:
        theirs = other.get(f"/jobs/{job_id}/stream")
        missing = other.get("/jobs/0123456789abcdef0123456789abcdef/stream")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.headers["content-type"] == missing.headers["content-type"] == "application/problem+json"
    assert theirs.text.replace(job_id, "ID") == missing.text.replace("0123456789abcdef0123456789abcdef", "ID")
    assert service.client.get(f"/jobs/{job_id}/stream", headers={"Authorization": ""}).status_code == 401
    for bad in ("1.2", "a.b.c", "1.2.3.4", "-1.0.0"):
        for kwargs in ({"headers": {"Last-Event-ID": bad}}, {"params": {"last_event_id": bad}}):
            answer = service.client.get(f"/jobs/{job_id}/stream", **kwargs)  # type: ignore[arg-type]
            assert answer.status_code == 422, (bad, answer.text)
            assert "last" in str(answer.json()["errors"][0]["loc"]).lower(), answer.json()


# The hub in-process, against the service's database: what an HTTP client cannot see from outside.


def test_a_closed_or_cancelled_stream_leaves_its_feed(service_settings: Settings, dataset: str) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    hub = stream.StreamHub(service_settings.model_copy(update={"stream_poll_seconds": 0.05}))

    async def scenario() -> None:
        messages = stream.job_stream(hub, job_id=job_id, cursor=stream.Cursor(), redact=None)
        assert (await anext(messages)).event == "progress"
        assert hub.subscribers == 1 and list(hub.feeds) == [job_id]
        await messages.aclose()  # the response stopped iterating
        assert hub.feeds == {}

        async def follow() -> None:
            async for _ in stream.job_stream(hub, job_id=job_id, cursor=stream.Cursor(), redact=None):
                pass

        # A client that disconnects: the response cancels the task waiting for the next batch.
        followers = [asyncio.create_task(follow()) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert hub.subscribers == 3 and len(hub.feeds) == 1  # one poller for the three
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        assert hub.feeds == {} and hub.subscribers == 0

    asyncio.run(scenario())


def test_a_stream_too_slow_for_its_queue_catches_up_without_a_gap(
    service_settings: Settings, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "QUEUE_BATCHES", 2)
    dropped: list[stream.Batch] = []

    class Watched(stream.Subscription):
        def put(self, batch: stream.Batch) -> None:
            if self._queue.full():
                dropped.append(batch)
            super().put(batch)

    monkeypatch.setattr(stream, "Subscription", Watched)
    job_id = insert_job(service_settings, dataset, status="running")
    hub = stream.StreamHub(service_settings.model_copy(update={"stream_poll_seconds": 0.02}))

    async def scenario() -> list[float]:
        messages = stream.job_stream(hub, job_id=job_id, cursor=stream.Cursor(), redact=None)
        assert [(await anext(messages)).event for _ in range(3)] == ["progress", "status", "event"]
        # Ten commits, each its own batch, while the stream reads nothing: its queue overflows.
        for step in range(10):
            await asyncio.to_thread(_write, service_settings, job_id, _point("Batch_loss", step, float(step)))
            await asyncio.sleep(0.1)
        values: list[float] = []
        while len(values) < 10:
            message = await asyncio.wait_for(anext(messages), timeout=30)
            if message.event == "metric":
                values.append(json.loads(str(message.data))["value"])
        await messages.aclose()
        return values

    assert asyncio.run(scenario()) == [float(step) for step in range(10)]
    assert dropped  # it did fall behind, and caught up from the database


def _connections(database_url: str) -> int:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            # Everything connected to this database (the API, the worker, this query), minus this one.
            count = connection.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            )
            return int(count or 0) - 1
    finally:
        engine.dispose()


async def _hundred_streams(
    service: Service, settings: Settings, job_ids: list[str]
) -> tuple[list[int | None], int, list[int]]:
    """Open 100 streams over the jobs (one at a time, each until its first messages), measuring
    database connections with 10 and with 100 open; then ask GET /jobs and write a point that every
    stream must receive. Returns (connections at 10 and 100 streams, GET /jobs status, points seen)."""
    postgres = service.backend == "postgres"
    limits = httpx.Limits(max_connections=150, max_keepalive_connections=150)
    async with (
        httpx.AsyncClient(
            base_url=service.base_url, headers=service.headers, timeout=60, limits=limits
        ) as client,
        AsyncExitStack() as stack,
    ):
        # The API's pool at its size first: any later growth would come from the streams.
        await asyncio.gather(*(client.get("/jobs") for _ in range(20)))
        readers = []
        counts: list[int | None] = []
        for i in range(100):
            response = await stack.enter_async_context(
                client.stream("GET", f"/jobs/{job_ids[i % len(job_ids)]}/stream")
            )
            assert response.status_code == 200
            reader = amessages(response.aiter_lines())
            while (await anext(reader)).event != "status":
                pass
            readers.append(reader)
            if i + 1 in (10, 100):
                await asyncio.sleep(2 * settings.stream_poll_seconds + 0.5)
                counts.append(
                    await asyncio.to_thread(_connections, settings.database_url) if postgres else None
                )
        status = (await client.get("/jobs", params={"limit": 5})).status_code
        for job_id in job_ids:
            await asyncio.to_thread(_write, settings, job_id, _point("Batch_loss", 0, 1.0))

        async def first_point(reader: Any) -> int:
            async for message in reader:
                if message.event == "metric":
                    return 1
            return 0

        seen = await asyncio.wait_for(asyncio.gather(*(first_point(r) for r in readers)), timeout=60)
    return counts, status, list(seen)


def test_a_hundred_open_streams_hold_no_connections(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_ids = [insert_job(service_settings, dataset, status="running") for _ in range(4)]
    counts, status, seen = asyncio.run(_hundred_streams(service, service_settings, job_ids))
    assert status == 200  # the API still answers with 100 streams open
    assert sum(seen) == 100  # and every stream still gets what is written
    if service.backend == "postgres":
        at_10, at_100 = counts
        assert at_10 is not None and at_100 is not None
        # Streams poll in short sessions through at most stream_db_sessions at a time: 90 more
        # streams add no connections (the slack is the worker's own sessions coming and going).
        assert at_100 <= at_10 + 2, counts


def test_max_points_downsamples_each_series_keeping_its_ends_and_extremes(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = insert_job(service_settings, dataset, status="running")
    base = datetime.now(UTC) - timedelta(hours=1)
    loss = [
        MetricPoint("Batch_loss", 1.0 + (i % 7) / 10, epoch=i // 100, step=i, time=base) for i in range(1000)
    ]
    loss[437] = MetricPoint("Batch_loss", 50.0, epoch=4, step=437, time=base)  # a spike
    loss[811] = MetricPoint("Batch_loss", -3.0, epoch=8, step=811, time=base)
    lr = [MetricPoint("Batch_lr", 0.01, epoch=i // 100, step=i, time=base) for i in range(300)]
    _write(service_settings, job_id, *loss, *lr)
    everything = service.metrics(job_id)
    url = f"/jobs/{job_id}/metrics"
    page = service.client.get(url, params={"max_points": 50}).json()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for point in page["items"]:
        by_name.setdefault(point["name"], []).append(point)
    assert set(by_name) == {"Batch_loss", "Batch_lr"}
    for name, points in by_name.items():
        full = [p for p in everything if p["name"] == name]
        assert 4 <= len(points) <= 50
        assert points[0] == full[0] and points[-1] == full[-1]
        assert [p for p in full if p in points] == points  # real points, in recorded order
        assert min(p["value"] for p in points) == min(p["value"] for p in full)
        assert max(p["value"] for p in points) == max(p["value"] for p in full)
    assert {p["value"] for p in by_name["Batch_loss"]} >= {50.0, -3.0}
    # next_cursor is the newest point read, so a client polls (or streams) on from there.
    assert page["next_cursor"] == service.client.get(url, params={"limit": 10000}).json()["next_cursor"]
    # A series shorter than max_points comes whole; with a cursor, only what follows it.
    assert service.client.get(url, params={"max_points": 5000, "name": "Batch_lr"}).json()["items"] == [
        p for p in everything if p["name"] == "Batch_lr"
    ]
    middle = service.client.get(url, params={"limit": 1200}).json()["next_cursor"]
    after = service.client.get(url, params={"max_points": 4, "cursor": middle}).json()
    assert {p["name"] for p in after["items"]} == {"Batch_lr"} and len(after["items"]) <= 4
    assert after["next_cursor"] == page["next_cursor"]
    for bad in (0, 3, 10001, "x"):
        answer = service.client.get(url, params={"max_points": bad})
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["loc"] == ["query", "max_points"]


@pytest.mark.slow
def test_a_training_streams_live_and_a_reconnect_loses_nothing(service: Service, dataset: str) -> None:
    job = service.submit(tiny_spec(dataset, name="stream-live", training={"max_epochs": 2}))
    status_at_first_point = None
    with open_stream(service.client, job["id"]) as stream:
        stream.read_until(lambda m: m.event == "metric", timeout=600)
        status_at_first_point = service.job(job["id"])["status"]
        stream.read_until(lambda m: sum(r.event == "metric" for r in stream.received) >= 5, timeout=600)
    # Disconnected mid-training; resumed from the last id received.
    with open_stream(service.client, job["id"], headers={"Last-Event-ID": stream.received[-1].id}) as resumed:
        rest = resumed.read_to_end(timeout=600)
    assert status_at_first_point == "running"  # points arrived while it trained
    received = stream.received + resumed.received
    _assert_ids_increase(received)
    statuses = [m.json()["status"] for m in received if m.event == "status"]
    assert "running" in statuses and statuses[-1] == "succeeded", statuses
    assert rest[-1].event == "status"
    assert _rows(received, "metric") == service.metrics(job["id"])
    assert _rows(received, "event") == service.events(job["id"])
    assert any(m.event == "progress" and m.json()["batch"] for m in received)
