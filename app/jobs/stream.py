"""Live feeds of jobs (`GET /jobs/{id}/stream`): status, progress, metric points and events as
Server-Sent Events, with ids a reconnect resumes from.

The writers are other processes (the worker and its training child), so the API learns about new
rows by polling. No stream holds a database connection: each API process runs one `Feed` per job
that has open streams, which polls every `stream_poll_seconds` in one short session and hands each
`Batch` to all that job's subscribers; the database work of all feeds and catch-ups goes through
one limiter of `stream_db_sessions` sessions, so a hundred streams cost the pool what two do.

Ids. A message's id is `<e>.<m>.<s>`: the last event row and metric row the stream has sent, and
the number of status and progress messages. Each message raises exactly one of the three, so ids
increase strictly (compared as tuples), and `Last-Event-ID: e.m.s` resumes with the events after `e`
and the points after `m`: no gap, no duplicate. Row ids follow commit order within a job, because
every transaction that writes a job's rows first updates its `jobs` row (the lease fence, a state
change), which holds the row lock until it commits; SQLite serializes all writes anyway. Status and
progress are snapshots, not rows: every connection starts with the current ones (`progress`, then
`status`), and `s` only keeps ids increasing across reconnects.

Messages (`event:` names): `status` (the job as GET /jobs/{id} shows it) when anything but its
progress changes, `progress` (its `progress`) when the epoch or batch moves, `metric` (a point, as
GET /jobs/{id}/metrics shows it), `event` (as GET /jobs/{id}/events shows it), and `superseded`: an
event telling that an attempt resuming at epoch `data.superseded_from_epoch` deleted the points of
that epoch and later (`app.jobs.lifecycle.supersede_from_epoch`); a client drops those points (or
fetches the series again), and the new attempt's points follow. Members get the redacted forms,
exactly as from the GET routes. The stream ends after a terminal status, once every row written
before it was sent: its last message is then that `status`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import anyio
from sse_starlette import ServerSentEvent

from app.db import session_scope
from app.jobs import service
from app.jobs.lifecycle import SUPERSEDED_KIND
from app.jobs.models import FINISHED_STATUSES, Job, JobEvent, Metric
from app.jobs.schemas import JobOut
from app.redaction import Redactor
from app.settings import Settings

logger = logging.getLogger(__name__)

# Rows one poll or catch-up query reads per table: a long history arrives in pages, not at once.
PAGE_ROWS = 1000
# Batches a subscriber may be behind before it is switched to catching up from the database.
QUEUE_BATCHES = 64
# The Last-Event-ID format (also the route's validation pattern).
ID_PATTERN = r"^[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,18}$"

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class Cursor:
    """Where a stream is: the last event row and metric row sent, and status/progress messages."""

    event: int = 0
    metric: int = 0
    snapshots: int = 0

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        if not value:
            return cls()
        event, metric, snapshots = (int(part) for part in value.split("."))
        return cls(event, metric, snapshots)

    def __str__(self) -> str:
        return f"{self.event}.{self.metric}.{self.snapshots}"


@dataclass
class Batch:
    """One poll of a job: its row (None once deleted) and its rows after `after`."""

    job: Job | None
    after: Cursor
    events: Sequence[JobEvent]
    metrics: Sequence[Metric]
    # Both queries returned less than a page: nothing written before the job row was read is left.
    complete: bool
    # The job and the rows as members and as admins see them: built once per batch, not once per
    # subscriber (keyed by "redacted", and the row's kind and id).
    _outs: dict[bool, JobOut] = field(default_factory=dict)
    rendered: dict[tuple[bool, str, int], str] = field(default_factory=dict)

    def job_out(self, redact: Redactor | None) -> JobOut:
        assert self.job is not None
        key = redact is None
        if key not in self._outs:
            self._outs[key] = service.to_out(self.job, redact)
        return self._outs[key]


class Subscription:
    """One open stream's mailbox. A subscriber that falls `QUEUE_BATCHES` behind (a slow client)
    loses its queued batches and catches up from the database instead: memory stays bounded and
    nothing is lost."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(QUEUE_BATCHES)
        self.overflowed = False

    def put(self, batch: Batch) -> None:
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            while not self._queue.empty():
                self._queue.get_nowait()
            self.overflowed = True
            self._queue.put_nowait(batch)

    async def get(self) -> tuple[Batch, bool]:
        """The next batch, and whether batches before it were dropped."""
        batch = await self._queue.get()
        dropped, self.overflowed = self.overflowed, False
        return batch, dropped


class Feed:
    """The poller of one job in this process: one short session per tick, whatever the number of
    subscribers; it stops when the last one leaves."""

    def __init__(self, hub: StreamHub, job_id: str, head: Cursor) -> None:
        self.hub = hub
        self.job_id = job_id
        self.head = head
        self.subscribers: set[Subscription] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # A subscriber joined: the next batch goes out even if nothing changed (its first one).
        self.joined = False
        self._seen: tuple[object, ...] | None = None

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                batch = await self.hub.run_db(self._poll, self.head)
            except Exception:
                # The database is away: the streams stay open (pings go on) and the next tick retries.
                logger.warning("polling job %s for its streams failed", self.job_id, exc_info=True)
                batch = None
            if batch is not None:
                if batch.events:
                    self.head = Cursor(batch.events[-1].id, self.head.metric)
                if batch.metrics:
                    self.head = Cursor(self.head.event, batch.metrics[-1].id)
                # A quiet tick (no rows, the job unchanged) wakes no one.
                seen = _fingerprint(batch.job)
                if batch.events or batch.metrics or seen != self._seen or self.joined:
                    self._seen, self.joined = seen, False
                    for subscriber in self.subscribers:
                        subscriber.put(batch)
                if not batch.complete:
                    continue  # more rows are waiting: the next page at once
            with anyio.move_on_after(self.hub.settings.stream_poll_seconds):
                await self.wake.wait()

    def _poll(self, after: Cursor) -> Batch:
        with session_scope(self.hub.settings.database_url) as session:
            # The job first: rows written before a terminal status committed are then visible to
            # the queries below, so the last batch of a finished job has them all.
            job = session.get(Job, self.job_id)
            events = service.events_between(
                session, job_id=self.job_id, after=after.event, upto=None, limit=PAGE_ROWS
            )
            metrics = service.metrics_between(
                session, job_id=self.job_id, after=after.metric, upto=None, limit=PAGE_ROWS
            )
            if job is not None:
                session.expunge(job)
        complete = len(events) < PAGE_ROWS and len(metrics) < PAGE_ROWS
        return Batch(job, after, events, metrics, complete)


# Written with every lease renewal and heartbeat; not what a client sees.
_NOT_SHOWN = frozenset({"heartbeat_at", "lease_expires_at"})


def _fingerprint(job: Job | None) -> tuple[object, ...] | None:
    if job is None:
        return None
    return tuple(repr(getattr(job, c.key)) for c in Job.__table__.columns if c.key not in _NOT_SHOWN)


class StreamHub:
    """The feeds of one API process (kept in `app.state`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.feeds: dict[str, Feed] = {}
        self._limiter: anyio.CapacityLimiter | None = None

    async def run_db(self, function: Callable[..., T], *args: Any) -> T:
        """Run blocking database work in a thread, at most `stream_db_sessions` at once."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.stream_db_sessions)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    @property
    def subscribers(self) -> int:
        return sum(len(feed.subscribers) for feed in self.feeds.values())

    def join(self, job_id: str, cursor: Cursor) -> tuple[Feed, Subscription]:
        feed = self.feeds.get(job_id)
        if feed is None:
            # A new feed starts where its first subscriber is: its first poll is that one's catch-up.
            feed = self.feeds[job_id] = Feed(self, job_id, Cursor(cursor.event, cursor.metric))
            feed.task = asyncio.get_running_loop().create_task(feed.run(), name=f"stream-feed-{job_id}")
        subscription = Subscription()
        feed.subscribers.add(subscription)
        feed.joined = True
        feed.wake.set()  # a poll now: the new stream's first messages come at once
        return feed, subscription

    def leave(self, feed: Feed, subscription: Subscription) -> None:
        feed.subscribers.discard(subscription)
        if not feed.subscribers and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
            if feed.task is not None:
                feed.task.cancel()

    def _rows_between(self, job_id: str, after: Cursor, upto: Cursor) -> tuple[list[JobEvent], list[Metric]]:
        with session_scope(self.settings.database_url) as session:
            events = service.events_between(
                session, job_id=job_id, after=after.event, upto=upto.event, limit=PAGE_ROWS
            )
            metrics = service.metrics_between(
                session, job_id=job_id, after=after.metric, upto=upto.metric, limit=PAGE_ROWS
            )
            return list(events), list(metrics)

    async def rows_between(
        self, job_id: str, after: Cursor, upto: Cursor
    ) -> AsyncIterator[tuple[Sequence[JobEvent], Sequence[Metric]]]:
        """A stream's catch-up: the rows after its cursor up to where its feed was, in pages."""
        while after.event < upto.event or after.metric < upto.metric:
            events, metrics = await self.run_db(self._rows_between, job_id, after, upto)
            if not events and not metrics:
                return
            yield events, metrics
            after = Cursor(
                events[-1].id if events else upto.event, metrics[-1].id if metrics else upto.metric
            )


def _time(row: JobEvent | Metric) -> datetime:
    return row.time


def _merged(events: Sequence[JobEvent], metrics: Sequence[Metric]) -> list[JobEvent | Metric]:
    """Both kinds of rows by time, each kind kept in id order (which resuming relies on)."""
    rows: list[Sequence[JobEvent | Metric]] = [events, metrics]
    return list(heapq.merge(*rows, key=_time))


def _progress_key(out: JobOut) -> tuple[object, ...]:
    # Not the ETA, which changes with the clock: a message when training moves, not every tick.
    p = out.progress
    return (p.epoch, p.max_epochs, p.batch, p.batches_per_epoch, p.percent)


def _state_key(out: JobOut) -> str:
    return out.model_copy(update={"progress": None}).model_dump_json()


class _Writer:
    """Builds one stream's messages, advancing its cursor with each."""

    def __init__(self, cursor: Cursor, redact: Redactor | None) -> None:
        self.cursor = cursor
        self.redact = redact
        self.state: str | None = None
        self.progress: tuple[object, ...] | None = None
        self.last: str | None = None

    def _message(self, name: str, data: str) -> ServerSentEvent:
        self.last = name
        return ServerSentEvent(data=data, event=name, id=str(self.cursor))

    def rows(
        self,
        events: Sequence[JobEvent],
        metrics: Sequence[Metric],
        rendered: dict[tuple[bool, str, int], str] | None = None,
    ) -> list[ServerSentEvent]:
        """Messages for the rows after the cursor; `rendered` caches their JSON across streams."""
        cache = {} if rendered is None else rendered
        redacted = self.redact is not None
        messages = []
        for row in _merged(events, metrics):
            if isinstance(row, Metric):
                if row.id <= self.cursor.metric:
                    continue
                self.cursor = Cursor(self.cursor.event, row.id, self.cursor.snapshots)
                key = (False, "metric", row.id)  # the same for everyone
                if key not in cache:
                    cache[key] = service.metric_to_out(row).model_dump_json()
                messages.append(self._message("metric", cache[key]))
            else:
                if row.id <= self.cursor.event:
                    continue
                self.cursor = Cursor(row.id, self.cursor.metric, self.cursor.snapshots)
                key = (redacted, "event", row.id)
                if key not in cache:
                    cache[key] = service.event_to_out(row, self.redact).model_dump_json()
                name = SUPERSEDED_KIND if row.kind == SUPERSEDED_KIND else "event"
                messages.append(self._message(name, cache[key]))
        return messages

    def status(self, out: JobOut) -> ServerSentEvent:
        self.state = _state_key(out)
        self.cursor = Cursor(self.cursor.event, self.cursor.metric, self.cursor.snapshots + 1)
        return self._message("status", out.model_dump_json())

    def progress_of(self, out: JobOut) -> ServerSentEvent:
        self.progress = _progress_key(out)
        self.cursor = Cursor(self.cursor.event, self.cursor.metric, self.cursor.snapshots + 1)
        return self._message("progress", out.progress.model_dump_json())

    def changes(self, out: JobOut) -> list[ServerSentEvent]:
        """`status` and `progress` messages for what changed since they were last sent."""
        messages = []
        if _state_key(out) != self.state:
            messages.append(self.status(out))
        if _progress_key(out) != self.progress:
            messages.append(self.progress_of(out))
        return messages


async def job_stream(
    hub: StreamHub, *, job_id: str, cursor: Cursor, redact: Redactor | None
) -> AsyncIterator[ServerSentEvent]:
    """The messages of one stream (see the module's docstring), until the job has finished, it is
    deleted, or `stream_max_seconds` have passed; the subscription ends with the generator (a
    client that disconnects cancels it)."""
    feed, subscription = hub.join(job_id, cursor)
    writer = _Writer(cursor, redact)
    deadline = time.monotonic() + hub.settings.stream_max_seconds
    first = True
    try:
        while True:
            batch: Batch | None = None
            dropped = False
            with anyio.move_on_after(deadline - time.monotonic()):
                batch, dropped = await subscription.get()
            if batch is None or batch.job is None:
                return  # past stream_max_seconds, or the job was deleted
            out = batch.job_out(redact)
            if first:
                # Every connection starts with where the job is now (status last, which is also
                # how a stream of a finished job ends).
                yield writer.progress_of(out)
                yield writer.status(out)
            if first or dropped:
                # The rows between where this stream is and where the batch starts.
                async for events, metrics in hub.rows_between(job_id, writer.cursor, batch.after):
                    for message in writer.rows(events, metrics):
                        yield message
            first = False
            for message in writer.rows(batch.events, batch.metrics, batch.rendered):
                yield message
            for message in writer.changes(out):
                yield message
            if out.status in FINISHED_STATUSES and batch.complete:
                if writer.last != "status":
                    yield writer.status(out)
                return
    finally:
        hub.leave(feed, subscription)
