"""A job's states: plain enums with no database code, so the client CLI can import them too."""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
ACTIVE_STATUSES = (JobStatus.queued, JobStatus.running)
