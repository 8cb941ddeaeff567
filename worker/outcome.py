"""How a training ended, recorded on the job: the result file and `record_outcome`.

Both sides use it: the training process writes its result file and records the outcome at once (so
a cancelled job shows as cancelled without waiting for torch to tear down); its supervisor
(`worker.runner`) records it again after the process exits, which the conditional update makes a
no-op, or from the exit status when the process died without a result file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from app.db import session_scope
from app.jobs import files, lifecycle
from app.jobs.models import FailureReason, JobStatus
from app.settings import Settings
from app.storage import StorageError
from worker.store_sync import job_sync

# What the supervisor returns when the job moved on from its attempt (nothing recorded).
LEASE_LOST = "lease_lost"
# The exit status of a training process that stopped because the job moved on (EX_TEMPFAIL).
LEASE_LOST_EXIT = 75
# A result with this key true is a lost attempt (its `message` says why, its `reason` is what the job
# fails with once its restarts are spent): the job is queued to resume, like after a kill. Only the
# supervisor records it, and so sends the job again.
LOST = "lost"

logger = logging.getLogger(__name__)


def write_result(job_dir: Path, attempt: int, result: dict[str, Any]) -> None:
    """Write the result file atomically (enum values as their strings), marked with its attempt."""
    path = files.result_file(job_dir)
    tmp = path.with_name(f"{path.name}.{attempt}.tmp")
    record = {k: (v.value if hasattr(v, "value") else v) for k, v in result.items()}
    tmp.write_text(json.dumps({**record, "attempt": attempt}))
    os.replace(tmp, path)


def read_result(job_dir: Path, attempt: int) -> dict[str, Any] | None:
    """The result file's record for `attempt`, or None when there is none (another attempt's file, or
    one that cannot be read)."""
    try:
        data = json.loads(files.result_file(job_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("attempt") == attempt else None


def signal_name(returncode: int) -> str:
    """The signal that killed a process with this (negative) return code: "SIGKILL", or "signal N"."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def killed_by_oom_killer(returncode: int) -> bool:
    """SIGKILL with no result written: most likely the kernel's out-of-memory killer."""
    return returncode == -signal.SIGKILL


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a text file (a console log); "" when it cannot be read."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def record_outcome(
    settings: Settings,
    *,
    job_id: str,
    attempt: int,
    job_dir: Path,
    returncode: int,
    killed_for_cancel: bool,
    stalled_for: float | None = None,
) -> str:
    """Finish the attempt from its result file, else from how its process ended; returns the job's
    status ("queued" when a lost attempt is to be resumed, "lease_lost" when the job had moved on).

    A process killed by a signal without a result (the out-of-memory killer, a crash of the machine's
    driver, a kill) is a lost attempt: resumed from the last checkpoint while restarts remain. On a
    final status, removes SG's training scratch and records the job's artifacts; every write is
    conditional on the attempt still holding the job.
    """
    result = read_result(job_dir, attempt)
    if result is None and returncode == LEASE_LOST_EXIT:
        return LEASE_LOST
    _push_last_output(settings, job_id=job_id, job_dir=job_dir)
    if result is not None and result.get(LOST):
        return _lose(
            settings,
            job_id=job_id,
            attempt=attempt,
            job_dir=job_dir,
            why=str(result.get("message")),
            reason=FailureReason(result["reason"]),
        )
    if result is None and returncode < 0 and stalled_for is None and not killed_for_cancel:
        oom = killed_by_oom_killer(returncode)
        why = f"the training process was killed by {signal_name(returncode)}" + (
            " (most likely the out-of-memory killer; lower training.batch_size or input_size)" if oom else ""
        )
        lost_as = FailureReason.out_of_memory if oom else FailureReason.worker_lost
        return _lose(settings, job_id=job_id, attempt=attempt, job_dir=job_dir, why=why, reason=lost_as)
    artifacts = files.collect_artifacts(job_dir)
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
        last = tail(files.console_log(job_dir))
        message = (
            f"the training made no progress for {stalled_for:.0f} s and was stopped; last output:\n{last}"
        )
    elif killed_for_cancel:
        status = JobStatus.cancelled
        message = f"the training did not stop within {settings.cancel_grace_seconds:g} s and was killed"
    else:
        status, reason = JobStatus.failed, FailureReason.internal
        last = tail(files.console_log(job_dir))
        message = f"the training process exited with code {returncode}; last output:\n{last}"
    with session_scope(settings.database_url) as session:
        done = lifecycle.finish(
            session,
            job_id=job_id,
            status=status,
            reason=reason,
            message=message,
            artifacts=artifacts,
            best_value=best,
            device=device,
            attempt=attempt,
        )
        recorded = None if done else lifecycle.status_of_attempt(session, job_id=job_id, attempt=attempt)
    if not done and recorded is None:
        return LEASE_LOST  # the job moved on: its files belong to the attempt that has it now
    # SG's scratch is removed only by the attempt that ended the job, never under a live one.
    files.remove_training_scratch(job_dir)
    return status.value if done else str(recorded)


def _lose(
    settings: Settings, *, job_id: str, attempt: int, job_dir: Path, why: str, reason: FailureReason
) -> str:
    """The attempt is lost: the job is queued to resume while restarts remain, else failed."""
    with session_scope(settings.database_url) as session:
        moved = lifecycle.lose_attempt(session, job_id=job_id, attempt=attempt, why=why, reason=reason)
    if moved is None:
        return LEASE_LOST
    if moved != JobStatus.queued:
        _record_files(settings, job_id=job_id, attempt=attempt, job_dir=job_dir)
    return moved.value


def _record_files(settings: Settings, *, job_id: str, attempt: int, job_dir: Path) -> None:
    """After a lost attempt ended the job: drop SG's scratch, record the files it left."""
    files.remove_training_scratch(job_dir)
    with session_scope(settings.database_url) as session:
        lifecycle.set_artifacts(session, job_id=job_id, artifacts=files.collect_artifacts(job_dir))


def _push_last_output(settings: Settings, *, job_id: str, job_dir: Path) -> None:
    """Upload what the training process wrote after its own last upload (the end of its console log)
    to a remote store; a failure is logged, the outcome recorded all the same."""
    try:
        sync = job_sync(settings, job_dir, job_id)
        if sync is not None:
            sync.push()
    except StorageError as exc:
        logger.warning("job %s: the console log could not be uploaded to the store: %s", job_id, exc)
