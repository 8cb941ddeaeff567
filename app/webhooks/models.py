"""The webhook outbox: one row per message, written with the status change it reports."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id, utcnow


class DeliveryState(enum.StrEnum):
    pending = "pending"  # to be sent (again) at `next_attempt_at`
    delivered = "delivered"  # a 2xx answer
    failed = "failed"  # every attempt failed; `last_error` says why


# The CHECK constraint on webhook_deliveries.state; migration 0007 creates it from this same text.
STATE_CHECK = "state IN ('pending', 'delivered', 'failed')"


class WebhookDelivery(Base):
    """One message about one final status of a job.

    The id is the message's `X-Sgjobs-Delivery`: the same on every attempt, so a receiver that sees
    it twice (an answer lost on the way back) can drop the second. `(job_id, sequence)` is unique,
    `sequence` being the job's `finishes` count that the status change set: a job that is resumed
    and ends again gets a new message, a status change reported twice is impossible. No foreign
    key: deleting a finished job does not take back the message about its end.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32))
    sequence: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    # What the message reports, as it was when the status changed (`app.webhooks.payload`).
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.pending)
    # Attempts started: each claim counts one, so a sender that dies mid-attempt used one up.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A sender holds a claimed row until then (database clock); past it another sender may take it.
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(STATE_CHECK, name="state"),
        UniqueConstraint("job_id", "sequence"),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )
