"""Runs one training in a child process and turns how it ended into the job's final state.

A child process per job keeps super-gradients' import side effects (stdout, logging, excepthook,
the process-global device) and its memory out of the worker, and lets a stuck job be killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.models import FailureReason, JobStatus
from app.process import die_with_parent
from app.settings import Settings

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CONSOLE_LOG = "console.log"
# The per-job training process; the job id is appended.
TRAIN_COMMAND: list[str] = [sys.executable, "-m", "worker.train_process"]


def collect_artifacts(job_dir: Path) -> dict[str, str]:
    """The job's files worth showing: checkpoints, the averaged model, TensorBoard logs, console log."""
    artifacts: dict[str, str] = {}
    console = job_dir / CONSOLE_LOG
    if console.is_file():
        artifacts["console_log"] = str(console)
    for name in ("ckpt_best.pth", "ckpt_latest.pth", "average_model.pth"):
        found = sorted(job_dir.rglob(name), key=lambda p: p.stat().st_mtime)
        if found:
            artifacts[name.removesuffix(".pth")] = str(found[-1])
    events = sorted(job_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if events:
        artifacts["tensorboard_dir"] = str(events[-1].parent)
    return artifacts


def remove_training_scratch(job_dir: Path) -> None:
    """Delete SG's model-averaging snapshots once training is over.

    `averaging_snapshots.pkl` holds ten full model copies (about 765 MB for YOLO-NAS-S) that SG
    needs only while training; the averaged model itself is kept as `average_model.pth`.
    """
    for path in job_dir.rglob("averaging_snapshots.pkl"):
        path.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    result_path = job_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(settings.as_env())
    env.update(
        {
            "CRASH_HANDLER": "FALSE",
            "CONSOLE_LOG_LEVEL": env.get("CONSOLE_LOG_LEVEL", "WARNING"),
            "SUPER_GRADIENTS_LOG_DIR": str(job_dir / "logs"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    killed_for_cancel = False
    stalled_for: float | None = None
    try:
        with open(job_dir / CONSOLE_LOG, "ab") as console:
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
                artifacts=collect_artifacts(job_dir),
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


def record_outcome(
    settings: Settings,
    *,
    job_id: str,
    job_dir: Path,
    returncode: int,
    killed_for_cancel: bool,
    stalled_for: float | None = None,
) -> str:
    result = _read_result(job_dir / RESULT_FILE)
    remove_training_scratch(job_dir)
    artifacts = collect_artifacts(job_dir)
    status: JobStatus
    reason: FailureReason | None = None
    message: str | None = None
    best: float | None = None
    device: str | None = None
    if result is not None:
        status = JobStatus(result["status"])
        reason = FailureReason(result["reason"]) if result.get("reason") else None
        message = result.get("message")
        best = result.get("best_value")
        device = result.get("device")
    elif stalled_for is not None:
        status, reason = JobStatus.failed, FailureReason.internal
        last = _tail(job_dir / CONSOLE_LOG)
        message = (
            f"the training made no progress for {stalled_for:.0f} s and was stopped; last output:\n{last}"
        )
    elif killed_for_cancel:
        status = JobStatus.cancelled
        message = f"the training did not stop within {settings.cancel_grace_seconds:g} s and was killed"
    elif returncode == -signal.SIGKILL:
        status, reason = JobStatus.failed, FailureReason.out_of_memory
        message = (
            "the training process was killed (SIGKILL), most likely by the out-of-memory killer; "
            "lower training.batch_size or input_size"
        )
    else:
        status, reason = JobStatus.failed, FailureReason.internal
        last = _tail(job_dir / CONSOLE_LOG)
        message = f"the training process exited with code {returncode}; last output:\n{last}"
    with session_scope(settings.database_url) as session:
        lifecycle.finish(
            session,
            job_id=job_id,
            status=status,
            reason=reason,
            message=message,
            artifacts=artifacts,
            best_value=best,
            device=device,
        )
    return status.value
