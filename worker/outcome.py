"""How a training ended, recorded on the job: the result file and `record_outcome`.

Both sides use it: the training process writes its result file and records the outcome at once (so
a cancelled job shows as cancelled without waiting for torch to tear down); its supervisor
(`worker.runner`) records it again after the process exits, which the conditional update makes a
no-op, or from the exit status when the process died without a result file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from app.db import session_scope
from app.jobs import files, lifecycle
from app.jobs.models import FailureReason, JobStatus
from app.settings import Settings


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    """Write the result file atomically (enum values as their strings)."""
    path = files.result_file(job_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: (v.value if hasattr(v, "value") else v) for k, v in result.items()}))
    os.replace(tmp, path)


def read_result(job_dir: Path) -> dict[str, Any] | None:
    """The result file's record, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads(files.result_file(job_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def record_outcome(
    settings: Settings,
    *,
    job_id: str,
    job_dir: Path,
    returncode: int,
    killed_for_cancel: bool,
    stalled_for: float | None = None,
) -> str:
    """Finish the job from its result file, else from how its process ended; returns the status.

    Also removes SG's training scratch and records the job's artifacts.
    """
    result = read_result(job_dir)
    files.remove_training_scratch(job_dir)
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
        last = _tail(files.console_log(job_dir))
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
        last = _tail(files.console_log(job_dir))
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
