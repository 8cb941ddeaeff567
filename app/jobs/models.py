"""Jobs, their events and their metric points."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, CheckConstraint, Float, ForeignKey, Index, Integer, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigIntPK, UTCDateTime, new_id, utcnow

# `X as X` re-exports them: the states live where code without a database can import them.
from app.jobs.states import ACTIVE_STATUSES as ACTIVE_STATUSES
from app.jobs.states import FINISHED_STATUSES as FINISHED_STATUSES
from app.jobs.states import JobStatus as JobStatus


class FailureReason(enum.StrEnum):
    dataset_error = "dataset_error"
    out_of_memory = "out_of_memory"
    worker_lost = "worker_lost"
    invalid_checkpoint = "invalid_checkpoint"
    disk_full = "disk_full"
    storage_unavailable = "storage_unavailable"
    internal = "internal"


# The CHECK constraint on jobs.status; migration 0004 creates it from this same text.
STATUS_CHECK = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str | None] = mapped_column(String(200))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    # What its creator could see, which the worker uses again: the tenant whose datasets (by id, and
    # by path inside that tenant's folder of the datasets directory) it may train on; None: any
    # (created with an admin key).
    scope: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued, index=True)
    model: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    classes: Mapped[list[str] | None] = mapped_column(JSON)

    epoch: Mapped[int | None] = mapped_column(Integer)
    max_epochs: Mapped[int] = mapped_column(Integer)
    batch: Mapped[int | None] = mapped_column(Integer)
    batches_per_epoch: Mapped[int | None] = mapped_column(Integer)
    best_metric_name: Mapped[str] = mapped_column(String(64))
    best_metric_value: Mapped[float | None] = mapped_column(Float)

    error_reason: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # What `spec.init_from` resolved to when the job was created (`app.jobs.schemas.StartedFrom`).
    started_from: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_dir: Mapped[str | None] = mapped_column(Text)
    artifacts: Mapped[dict[str, str] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))

    # The running attempt: incremented by each claim. Every write a training makes is conditional on
    # its attempt number and on `lease_expires_at` (a database time) being in the future.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Attempts lost (worker killed, lease expired) and resumed automatically; at most max_restarts.
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_restarts: Mapped[int] = mapped_column(Integer, default=2, server_default="2")
    # Final statuses reached so far (a resumed job can end again): set by the status change, it
    # numbers the job's webhook messages (`app.webhooks.models.WebhookDelivery.sequence`).
    finishes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    training_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (CheckConstraint(STATUS_CHECK, name="status"),)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # state | log | superseded
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    # The id is a cursor (GET /jobs/{id}/events, streams): SQLite must never reuse one.
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"), {"sqlite_autoincrement": True})


class Metric(Base):
    __tablename__ = "metrics"

    # The id doubles as the poll cursor: one training process writes a job's points in order, and
    # SQLite never reuses one (AUTOINCREMENT), also after `supersede_from_epoch` deleted the newest.
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    epoch: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_metrics_job_id_id", "job_id", "id"),
        Index("ix_metrics_job_id_name_id", "job_id", "name", "id"),
        {"sqlite_autoincrement": True},
    )


# The tables as what `__table__` is at run time (typed only as a FromClause), for Core statements
# built once and run often beside trainings: the training process's reports, the warmer's look.
JOBS = cast(Table, Job.__table__)
METRICS = cast(Table, Metric.__table__)
