"""The message body: what a job's end looked like (recorded with the status change), rendered with
the sender's settings (links, redaction) at each attempt."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from app.redaction import Redactor
from app.settings import Settings


def snapshot(
    *,
    job_id: str,
    name: str | None,
    status: str,
    attempt: int,
    best_metric_name: str,
    best_metric_value: float | None,
    error_reason: str | None,
    error_message: str | None,
    finished_at: datetime | None,
) -> dict[str, Any]:
    """What the outbox row keeps: the job as it ended (a later resume does not change the message)."""
    return {
        "job_id": job_id,
        "name": name,
        "status": status,
        "attempt": attempt,
        "best_metric": {"name": best_metric_name, "value": best_metric_value},
        "error": {"reason": error_reason, "message": error_message or ""}
        if error_reason or error_message
        else None,
        "finished_at": finished_at.isoformat() if finished_at is not None else None,
    }


def links(settings: Settings, job_id: str) -> dict[str, str]:
    """Absolute URLs of the job's pages in the API."""
    job = f"{settings.base_url}/jobs/{job_id}"
    return {
        "job": job,
        "metrics": f"{job}/metrics",
        "events": f"{job}/events",
        "artifacts": f"{job}/artifacts",
    }


def render(
    settings: Settings, *, delivery_id: str, event: str, recorded: dict[str, Any], now: float | None = None
) -> tuple[bytes, int]:
    """The body bytes of one attempt and its timestamp (Unix seconds, also in the body, so the
    signature covers it: a receiver can refuse old messages replayed to it).

    The error message leaves the service: it is redacted as for a member of the job's tenant (no
    host paths, host names or process ids).
    """
    timestamp = int(time.time() if now is None else now)
    error = recorded.get("error")
    if error is not None:
        error = {**error, "message": Redactor(settings).text(error.get("message") or "")}
    body = {
        "event": event,
        "delivery_id": delivery_id,
        "timestamp": timestamp,
        "job_id": recorded["job_id"],
        "name": recorded.get("name"),
        "status": recorded["status"],
        "attempt": recorded.get("attempt"),
        "best_metric": recorded.get("best_metric"),
        "error": error,
        "finished_at": recorded.get("finished_at"),
        "links": links(settings, recorded["job_id"]),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(), timestamp
