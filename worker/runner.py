"""Runs one training in a child process and supervises it: heartbeats, stalls, cancels.

A child process per job keeps super-gradients' import side effects (stdout, logging, excepthook,
the process-global device) and its memory out of the worker, and lets a stuck job be killed. How it
ended is recorded by `worker.outcome`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from app.db import session_scope
from app.jobs import files, lifecycle
from app.jobs.models import FailureReason, JobStatus
from app.ml.sg_setup import sg_environment
from app.process import die_with_parent
from app.settings import Settings
from worker.outcome import record_outcome

logger = logging.getLogger(__name__)

# The per-job training process; the job id is appended.
TRAIN_COMMAND: list[str] = [sys.executable, "-m", "worker.train_process"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_training_process(settings: Settings, *, job_id: str, job_dir: Path) -> str:
    """Train a claimed job in a child process, supervise it, and record the outcome. Returns the status."""
    job_dir.mkdir(parents=True, exist_ok=True)
    files.result_file(job_dir).unlink(missing_ok=True)
    env = {**os.environ, **settings.as_env(), **sg_environment(files.sg_log_dir(job_dir))}
    killed_for_cancel = False
    stalled_for: float | None = None
    try:
        with open(files.console_log(job_dir), "ab") as console:
            proc = subprocess.Popen(
                [*TRAIN_COMMAND, job_id],
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=job_dir,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            cancel_seen: float | None = None
            marker: tuple[object, ...] | None = None
            marker_since = time.monotonic()
            while True:
                try:
                    returncode = proc.wait(timeout=settings.heartbeat_seconds)
                    break
                except subprocess.TimeoutExpired:
                    pass
                with session_scope(settings.database_url) as session:
                    cancel = lifecycle.heartbeat(session, job_id=job_id)
                    current = lifecycle.activity_marker(session, job_id=job_id)
                if current != marker:
                    marker, marker_since = current, time.monotonic()
                elif time.monotonic() - marker_since > settings.stall_timeout_seconds:
                    # Alive but silent (a deadlocked data loader, a hung device): never leave it running.
                    stalled_for = time.monotonic() - marker_since
                    logger.warning("job %s made no progress for %.0f s; killing it", job_id, stalled_for)
                    _stop(proc)
                    returncode = proc.returncode
                    break
                if cancel and cancel_seen is None:
                    cancel_seen = time.monotonic()
                if cancel_seen is not None and time.monotonic() - cancel_seen > settings.cancel_grace_seconds:
                    # The child checks for cancels itself; this is for a child stuck outside training.
                    logger.warning(
                        "job %s did not stop %ss after cancel; killing it",
                        job_id,
                        settings.cancel_grace_seconds,
                    )
                    killed_for_cancel = True
                    _stop(proc)
                    returncode = proc.returncode
                    break
    except BaseException as exc:
        with session_scope(settings.database_url) as session:
            lifecycle.finish(
                session,
                job_id=job_id,
                status=JobStatus.failed,
                reason=FailureReason.internal,
                message=f"the worker could not supervise the training: {exc}",
                artifacts=files.collect_artifacts(job_dir),
            )
        raise
    return record_outcome(
        settings,
        stalled_for=stalled_for,
        job_id=job_id,
        job_dir=job_dir,
        returncode=returncode,
        killed_for_cancel=killed_for_cancel,
    )
