"""What the API shows of a job's webhook messages."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.webhooks.models import DeliveryState


class WebhookDeliveryOut(BaseModel):
    """One message about one end of the job, and how sending it went."""

    id: str = Field(description="The message's X-Sgjobs-Delivery: the same on every attempt.")
    event: str = Field(description="X-Sgjobs-Event, e.g. job.finished.")
    status: str = Field(description="The job status the message reports.")
    url: str
    state: DeliveryState = Field(description="pending (to be tried again), delivered or failed.")
    attempts: int = Field(description="Attempts started so far.")
    last_status_code: int | None = Field(description="The receiver's last HTTP status, if it answered.")
    last_error: str | None = Field(description="Why the last attempt failed.")
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When a pending message is tried next.")
    completed_at: datetime | None = Field(description="When it was delivered or given up.")


class WebhookDeliveryList(BaseModel):
    """A job's webhook messages, oldest first."""

    items: list[WebhookDeliveryOut]
