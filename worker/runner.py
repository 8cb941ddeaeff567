"""Runs one attempt of a training in a child process and supervises it: lease, stalls, cancels, stop.

A child process per attempt keeps super-gradients' import side effects (stdout, logging, excepthook,
the process-global device) and its memory out of the worker, and lets a stuck job be killed. How it
ended is recorded by `worker.outcome`.

The supervisor never gives up on a live child: while the database is away it keeps the child and
retries with backoff, and it returns (letting the worker take the next job) only once the child has
exited, so one worker never runs two trainings.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from app.db import session_scope
from app.jobs import dispatch, files, lifecycle
from app.jobs.models import FINISHED_STATUSES, JobStatus
from app.ml.sg_setup import training_environment
from app.process import die_with_parent
from app.settings import Settings
from worker.outcome import LEASE_LOST, record_outcome
from worker.standby import StandbySlot
from worker.store_sync import drop_local_copy

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A training process started for its attempt; the job id and the attempt number are appended.
# (`worker.standby`'s fork server forks them ahead of their job, showing this command line too.)
TRAIN_PROCESS_MODULE = "worker.train_process"
TRAIN_COMMAND: list[str] = [sys.executable, "-m", TRAIN_PROCESS_MODULE]
# How often the supervisor looks at its child and at a shutdown request.
POLL_SECONDS = 0.5
# How long a training whose job moved on may take to notice and exit by itself (a batch, teardown),
# and one that recorded its outcome may take to tear down.
LEASE_LOST_GRACE_SECONDS = 30.0
# The longest wait between two tries while the database is unreachable.
MAX_BACKOFF_SECONDS = 30.0

HANDED_BACK = "handed_back"


class TrainingProcess(Protocol):
    """What the supervisor uses of a training process: a `subprocess.Popen` started for the attempt,
    or a `ForkedTraining` (forked by the worker's fork server)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def _stop(proc: TrainingProcess, grace: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ExitWatch:
    """Waits for a child process to exit, waking once per wait: `Popen.wait(timeout)` polls with
    sleeps of at most 50 ms, and during a training that was 30 wake-ups a second of the worker, each
    taking a core from one of torch's threads on a 2-core machine (measured). Uses a pidfd (Linux
    5.3+); elsewhere falls back to `Popen.wait`. (A `ForkedTraining` waits on its fork server's
    socket, which says when the child has exited.)"""

    def __init__(self, proc: TrainingProcess) -> None:
        self.proc = proc
        self._fd: int | None = None
        if isinstance(proc, subprocess.Popen):
            try:
                self._fd = os.pidfd_open(proc.pid)
            except (AttributeError, OSError):
                self._fd = None

    def wait(self, timeout: float) -> int | None:
        """The return code once the process has exited, waiting up to `timeout` seconds; else None."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        if self._fd is None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        select.select([self._fd], [], [], timeout)
        return self.proc.poll()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _retrying(what: str, fn: Callable[[], T], stop_after: float | None = None) -> T:
    """Call `fn` until it succeeds (it fails while the database is away), with backoff."""
    delay, started = 1.0, time.monotonic()
    while True:
        try:
            return fn()
        except Exception as exc:
            if stop_after is not None and time.monotonic() - started > stop_after:
                raise
            logger.warning("could not %s (%s); retrying in %.0f s", what, exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)


def run_training_process(
    settings: Settings,
    *,
    job_id: str,
    attempt: int,
    job_dir: Path,
    shutdown: threading.Event | None = None,
    standby: StandbySlot | None = None,
) -> str:
    """Train a claimed attempt in a child process, supervise it, and record the outcome.

    With `standby`, the attempt goes to the worker's fork server (`worker.standby`) when it has a
    usable one (else to a fresh process, as without).

    Returns the job's status, `HANDED_BACK` when `shutdown` was set (the worker is stopping: the job
    goes back to the queue at once, for another worker to resume), or `LEASE_LOST` when the job moved
    on from this attempt (nothing is recorded then).
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    env = training_environment(settings, files.sg_log_dir(job_dir))
    proc: TrainingProcess
    forked = standby.take(settings, env, job_id=job_id, attempt=attempt) if standby is not None else None
    if forked is not None:
        logger.info("job %s: attempt %d goes to fork server %d", job_id, attempt, forked.server.proc.pid)
        proc = forked
    else:
        with open(files.console_log(job_dir), "ab") as console:
            proc = subprocess.Popen(
                [*TRAIN_COMMAND, job_id, str(attempt)],
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=job_dir,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
    try:
        return _supervise(settings, proc, job_id=job_id, attempt=attempt, job_dir=job_dir, shutdown=shutdown)
    finally:
        if forked is not None and forked.itself:  # a spare's folder, now that it has exited
            shutil.rmtree(forked.server.directory, ignore_errors=True)


def _supervise(
    settings: Settings,
    proc: TrainingProcess,
    *,
    job_id: str,
    attempt: int,
    job_dir: Path,
    shutdown: threading.Event | None,
) -> str:
    killed_for_cancel = False
    stalled_for: float | None = None
    cancel_seen: float | None = None
    marker: tuple[object, ...] | None = None
    marker_since = time.monotonic()
    next_beat = time.monotonic() + settings.heartbeat_interval
    backoff = settings.heartbeat_interval
    recorded_at: float | None = None  # when the child was seen to have recorded its own outcome
    exit_watch = ExitWatch(proc)
    try:
        while True:
            exited = exit_watch.wait(POLL_SECONDS)
            if exited is not None:
                returncode = exited
                break
            if recorded_at is not None:
                if time.monotonic() - recorded_at > LEASE_LOST_GRACE_SECONDS:
                    # Its outcome is recorded; a teardown that hangs must not hold the worker.
                    logger.warning(
                        "job %s: training process %d still running %.0f s after recording the outcome; "
                        "stopping it",
                        job_id,
                        proc.pid,
                        LEASE_LOST_GRACE_SECONDS,
                    )
                    _stop(proc)
                    returncode = proc.wait()
                    break
                continue
            if shutdown is not None and shutdown.is_set():
                return _hand_back(settings, proc, job_id=job_id, attempt=attempt)
            if time.monotonic() < next_beat:
                continue
            try:
                with session_scope(settings.database_url) as session:
                    held, cancel = lifecycle.heartbeat(
                        session, job_id=job_id, attempt=attempt, lease_seconds=settings.lease_seconds
                    )
                    current = lifecycle.activity_marker(session, job_id=job_id)
                    recorded = (
                        None if held else lifecycle.status_of_attempt(session, job_id=job_id, attempt=attempt)
                    )
            except Exception as exc:
                # Keep the child: its own writes wait for the database too, and its checkpoints
                # are still worth having. Never take another job while it runs.
                logger.warning("job %s: database unreachable (%s); retrying in %.0f s", job_id, exc, backoff)
                next_beat = time.monotonic() + backoff
                backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)
                continue
            next_beat = time.monotonic() + settings.heartbeat_interval
            backoff = settings.heartbeat_interval
            if not held:
                if recorded in FINISHED_STATUSES:
                    # The child recorded its own outcome and is tearing torch down: let it finish.
                    recorded_at = time.monotonic()
                    continue
                # The child finds out at its next write and exits without writing; give it time to.
                logger.warning("job %s moved on from attempt %d; stopping its training", job_id, attempt)
                try:
                    proc.wait(timeout=LEASE_LOST_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    _stop(proc)
                return LEASE_LOST
            if current != marker:
                marker, marker_since = current, time.monotonic()
            elif time.monotonic() - marker_since > settings.stall_timeout_seconds:
                # Alive but silent (a deadlocked data loader, a hung device): never leave it running.
                stalled_for = time.monotonic() - marker_since
                logger.warning("job %s made no progress for %.0f s; killing it", job_id, stalled_for)
                _stop(proc)
                returncode = proc.wait()
                break
            if cancel and cancel_seen is None:
                cancel_seen = time.monotonic()
            if cancel_seen is not None and time.monotonic() - cancel_seen > settings.cancel_grace_seconds:
                # The child checks for cancels itself; this is for a child stuck outside training.
                logger.warning(
                    "job %s did not stop %ss after cancel; killing it", job_id, settings.cancel_grace_seconds
                )
                killed_for_cancel = True
                _stop(proc)
                returncode = proc.wait()
                break
    finally:
        exit_watch.close()
        if proc.poll() is None:  # an error in this loop: never leave the child unsupervised
            _stop(proc)
    logger.info(
        "job %s: training process %d of attempt %d exited with %d", job_id, proc.pid, attempt, returncode
    )
    status = _retrying(
        f"record the outcome of job {job_id}",
        lambda: record_outcome(
            settings,
            job_id=job_id,
            attempt=attempt,
            job_dir=job_dir,
            returncode=returncode,
            killed_for_cancel=killed_for_cancel,
            stalled_for=stalled_for,
        ),
    )
    if status == JobStatus.queued:
        dispatch.send(settings, job_id=job_id)
    elif status in FINISHED_STATUSES:
        drop_local_copy(settings, job_dir)
    return status


def _hand_back(settings: Settings, proc: TrainingProcess, *, job_id: str, attempt: int) -> str:
    logger.info("worker stopping: handing job %s (attempt %d) back", job_id, attempt)
    _stop(proc, grace=5.0)

    def hand_back() -> bool:
        with session_scope(settings.database_url) as session:
            return lifecycle.hand_back(session, job_id=job_id, attempt=attempt, why="the worker is stopping")

    # Bounded: past one lease the sweeper of another worker resumes the job anyway.
    handed = _retrying(f"hand job {job_id} back", hand_back, stop_after=settings.lease_seconds)
    if handed:
        dispatch.send(settings, job_id=job_id)
    return HANDED_BACK
