"""What this worker process is doing, shared by its task (the main thread) and its sweeper thread."""

from __future__ import annotations

import threading
import time


class WorkerState:
    """The job in training (if any), since when the worker is idle, and whether it is stopping."""

    def __init__(self) -> None:
        self.name: str | None = None  # Celery's node name, known once the worker is ready
        self.job_id: str | None = None
        self.idle_since: float | None = time.monotonic()
        # Set by the shutdown signal (SIGTERM, SIGINT): the running attempt is handed back at once.
        self.stopping = threading.Event()

    def busy(self, job_id: str) -> None:
        self.job_id, self.idle_since = job_id, None

    def idle(self) -> None:
        self.job_id, self.idle_since = None, time.monotonic()

    def idle_for(self) -> float:
        """Seconds without a job (0 while training)."""
        since = self.idle_since
        return 0.0 if since is None else time.monotonic() - since


STATE = WorkerState()
