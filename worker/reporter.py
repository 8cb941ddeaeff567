"""The training process's link to the database: batched, fenced metric writes and a cheap cancel flag.

A background thread writes whatever the training produced every `interval` seconds, in one
transaction, and reads the cancel flag in the same round trip; the training loop itself only
appends to a list and reads a boolean, so it never waits on the database.

Every transaction first renews this attempt's lease (`lifecycle.report`, which also records the
progress and reads the cancel flag in the same statement); when the job has moved on
(the lease expired and another attempt took over, it was handed back or finished) nothing is
written, and the training stops at its next batch with `LeaseLost`. A row the database refuses
(a name it cannot store) is dropped with an event instead of blocking every later write.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from app.db import connection_lost, session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Metric
from app.ml.types import LeaseLost, MetricPoint, greater_is_better

logger = logging.getLogger(__name__)


class DbReporter:
    """Implements `app.ml.types.Reporter` for one job."""

    def __init__(
        self,
        *,
        database_url: str,
        job_id: str,
        attempt: int,
        lease_seconds: float,
        interval: float,
        watch: str | None = None,
    ) -> None:
        self._database_url = database_url
        self._job_id = job_id
        self._attempt = attempt
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._lost = threading.Event()
        # SG logs validation scalars as "Valid_<title>"; this one feeds the job's best_metric.
        self._watch = f"Valid_{watch}" if watch else None
        self._greater = greater_is_better(watch) if watch else True
        self._best: float | None = None
        self._best_dirty = False
        self._lock = threading.Lock()
        self._points: list[MetricPoint] = []
        self._events: list[dict[str, Any]] = []
        self._progress: lifecycle.Progress | None = None
        self._cancel = threading.Event()
        self._checked_at = 0.0  # monotonic time of the last read of the cancel flag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DbReporter:
        """Start the background writer (and read the cancel flag once, synchronously)."""
        self.flush()
        self._thread = threading.Thread(target=self._run, name="sgjobs-reporter", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the writer and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    @property
    def best(self) -> float | None:
        return self._best

    def resume_best(self, value: float | None) -> None:
        """Start from the best value of the epochs an earlier attempt finished (already recorded)."""
        with self._lock:
            self._best, self._best_dirty = value, False

    # Reporter protocol -------------------------------------------------------------------------

    def metrics(self, points: list[MetricPoint]) -> None:
        now = utcnow()
        stamped = [p if p.time is not None else replace(p, time=now) for p in points]
        with self._lock:
            self._points.extend(stamped)
            for p in stamped:
                if self._watch and p.name == self._watch and p.value == p.value:  # not NaN
                    if self._best is None or (
                        p.value > self._best if self._greater else p.value < self._best
                    ):
                        self._best = p.value
                        self._best_dirty = True

    def progress(self, *, epoch: int, max_epochs: int, batch: int, batches_per_epoch: int) -> None:
        with self._lock:
            self._progress = lifecycle.Progress(epoch, batch, batches_per_epoch)

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._events.append({"message": message, "level": level, "data": data, "time": utcnow()})

    def should_stop(self) -> bool:
        if self._lost.is_set():
            raise LeaseLost(f"attempt {self._attempt} of job {self._job_id} no longer holds its lease")
        # Normally the writer thread keeps the flag fresh. When it lags (a slow database, a starved
        # thread on a loaded machine), read the flag here, so a cancel still stops the next batch.
        if not self._cancel.is_set() and time.monotonic() - self._checked_at > 2 * self._interval:
            try:
                with session_scope(self._database_url) as session:
                    if lifecycle.cancel_requested(session, job_id=self._job_id):
                        self._cancel.set()
                self._checked_at = time.monotonic()
            except Exception:
                logger.exception("could not read the cancel flag; will retry")
        return self._cancel.is_set()

    @property
    def lost(self) -> bool:
        """True once the job has moved on from this attempt."""
        return self._lost.is_set()

    def holds_lease(self) -> bool:
        """Write what is buffered and renew the lease now; retried while the database is away, for
        up to one lease period (after that another attempt may have taken over)."""
        deadline = time.monotonic() + self._lease_seconds
        delay = 0.5
        while not self._lost.is_set():
            if self._flush():
                return True
            if time.monotonic() + delay > deadline:
                logger.warning("could not renew the lease for %.0f s; not writing", self._lease_seconds)
                return False
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
        return False

    def flush(self) -> None:
        """Write everything buffered now (kept for the next try if the database is away)."""
        self._flush()

    def _flush(self) -> bool:
        """Write everything buffered in one fenced transaction; False when it could not (kept for
        the next try) or when the job has moved on (dropped)."""
        if self._lost.is_set():
            return False
        with self._lock:
            points, self._points = self._points, []
            events, self._events = self._events, []
            progress, self._progress = self._progress, None
            best_dirty, self._best_dirty = self._best_dirty, False
        try:
            with session_scope(self._database_url) as session:
                if not self._write(session, points, events, progress, best_dirty):
                    return False
            self._checked_at = time.monotonic()
            return True
        except Exception as exc:
            if not connection_lost(exc):
                # The database or the driver refused a row (a value it cannot store or serialize):
                # find it and drop it, rather than retry the same batch forever.
                logger.warning("a row was refused (%s); writing row by row", exc)
                try:
                    self._write_row_by_row(points, events, progress, best_dirty)
                    self._checked_at = time.monotonic()
                    return True
                except Exception as again:
                    if not connection_lost(again):
                        raise
            # The database is away: keep the data for the next attempt rather than lose it.
            logger.warning("could not write training progress (database unreachable); will retry")
        with self._lock:
            self._points[:0] = points
            self._events[:0] = events
            if self._progress is None:
                self._progress = progress
            self._best_dirty = self._best_dirty or best_dirty
        return False

    def _fence(
        self, session: Session, progress: lifecycle.Progress | None = None, best_dirty: bool = False
    ) -> bool:
        """Renew the lease (recording the progress and best value, reading the cancel flag); False,
        and nothing more written by this attempt, when the job has moved on."""
        cancel = lifecycle.report(
            session,
            job_id=self._job_id,
            attempt=self._attempt,
            lease_seconds=self._lease_seconds,
            progress=progress,
            best=self._best,
            best_changed=best_dirty,
        )
        if cancel is None:
            logger.warning(
                "job %s moved on from attempt %d: writing nothing more", self._job_id, self._attempt
            )
            self._lost.set()
            return False
        if cancel:
            self._cancel.set()
        return True

    def _write(
        self,
        session: Session,
        points: list[MetricPoint],
        events: list[dict[str, Any]],
        progress: lifecycle.Progress | None,
        best_dirty: bool,
    ) -> bool:
        if not self._fence(session, progress, best_dirty):
            return False
        lifecycle.add_metrics(session, job_id=self._job_id, points=[_storable(p) for p in points])
        for e in events:
            lifecycle.add_event(session, job_id=self._job_id, **_storable_event(e))
        return True

    def _write_row_by_row(
        self,
        points: list[MetricPoint],
        events: list[dict[str, Any]],
        progress: lifecycle.Progress | None,
        best_dirty: bool,
    ) -> None:
        """One transaction per row; a refused row is dropped and said so in an event."""
        with session_scope(self._database_url) as session:
            if not self._write(session, [], [], progress, best_dirty):
                return
        dropped: list[str] = []
        rows: list[tuple[list[MetricPoint], list[dict[str, Any]]]] = [([p], []) for p in points]
        rows += [([], [e]) for e in events]
        for row_points, row_events in rows:
            try:
                with session_scope(self._database_url) as session:
                    if not self._write(session, row_points, row_events, None, False):
                        return
            except Exception as exc:
                if connection_lost(exc):
                    raise
                what = (
                    f"metric {row_points[0].name!r}" if row_points else f"event {row_events[0]['message']!r}"
                )
                cause = getattr(exc, "orig", None) or exc
                dropped.append(f"{what[:300]}: {(str(cause).splitlines() or [''])[0][:300]}")
        if dropped:
            with session_scope(self._database_url) as session:
                if self._fence(session):
                    lifecycle.add_event(
                        session,
                        job_id=self._job_id,
                        level="warning",
                        message=f"dropped {len(dropped)} row(s) the database refused",
                        data={"dropped": dropped[:50]},
                    )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()


# What the database can store: no NUL (PostgreSQL refuses it in text), names within the column.
_NAME_LENGTH = Metric.__table__.c.name.type.length  # type: ignore[attr-defined]


def _clean(text: str, limit: int | None = None) -> str:
    text = text.replace("\x00", "\ufffd")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "\u2026"


def _storable(point: MetricPoint) -> MetricPoint:
    name = _clean(point.name, _NAME_LENGTH)
    return point if name == point.name else replace(point, name=name)


def _storable_event(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "message": _clean(str(event["message"]))}
