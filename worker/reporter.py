"""The training process's link to the database: batched metric writes and a cheap cancel flag.

A background thread writes whatever the training produced every `interval` seconds, in one
transaction, and reads the cancel flag in the same round trip; the training loop itself only
appends to a list and reads a boolean, so it never waits on the database.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.ml.types import MetricPoint, greater_is_better

logger = logging.getLogger(__name__)


class DbReporter:
    """Implements `app.ml.types.Reporter` for one job."""

    def __init__(
        self,
        *,
        database_url: str,
        job_id: str,
        interval: float,
        watch: str | None = None,
    ) -> None:
        self._database_url = database_url
        self._job_id = job_id
        self._interval = interval
        # SG logs validation scalars as "Valid_<title>"; this one feeds the job's best_metric.
        self._watch = f"Valid_{watch}" if watch else None
        self._greater = greater_is_better(watch) if watch else True
        self._best: float | None = None
        self._best_dirty = False
        self._lock = threading.Lock()
        self._points: list[MetricPoint] = []
        self._events: list[dict[str, Any]] = []
        self._progress: dict[str, int] | None = None
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
            self._progress = {"epoch": epoch, "batch": batch, "batches_per_epoch": batches_per_epoch}

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._events.append({"message": message, "level": level, "data": data, "time": utcnow()})

    def should_stop(self) -> bool:
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

    def flush(self) -> None:
        with self._lock:
            points, self._points = self._points, []
            events, self._events = self._events, []
            progress, self._progress = self._progress, None
            best_dirty, self._best_dirty = self._best_dirty, False
        try:
            with session_scope(self._database_url) as session:
                lifecycle.add_metrics(session, job_id=self._job_id, points=points)
                for e in events:
                    lifecycle.add_event(session, job_id=self._job_id, **e)
                if progress is not None:
                    lifecycle.record_progress(session, job_id=self._job_id, **progress)
                if best_dirty:
                    lifecycle.record_best(session, job_id=self._job_id, value=self._best)
                if lifecycle.cancel_requested(session, job_id=self._job_id):
                    self._cancel.set()
            self._checked_at = time.monotonic()
        except Exception:
            # Keep the data for the next attempt rather than lose it to a transient DB error.
            logger.exception("could not write training progress; will retry")
            with self._lock:
                self._points[:0] = points
                self._events[:0] = events
                if self._progress is None:
                    self._progress = progress
                self._best_dirty = self._best_dirty or best_dirty

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()
