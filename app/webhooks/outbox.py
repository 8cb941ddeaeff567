"""The outbox's queries: add a message (in the transaction of the status change it reports), claim
due messages, record how an attempt went.

Claims are conditional UPDATEs, so any number of senders (the API, every worker) can run: each
message is held by one of them at a time, until `locked_until` (database clock). A sender that dies
holding one lets the hold lapse and another sends it again, with the same delivery id.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from app.db import changed, db_now, utcnow
from app.webhooks.models import DeliveryState, WebhookDelivery

JOB_FINISHED = "job.finished"


def add(session: Session, *, job_id: str, sequence: int, url: str, payload: dict[str, Any]) -> None:
    """Queue a message about a job's final status `sequence` (its `finishes` count); call in the
    transaction that made the status change."""
    session.add(
        WebhookDelivery(
            job_id=job_id,
            sequence=sequence,
            event=JOB_FINISHED,
            url=url,
            payload=payload,
            state=DeliveryState.pending,
            attempts=0,
            next_attempt_at=utcnow(),
            created_at=utcnow(),
        )
    )


@dataclass(frozen=True)
class Claimed:
    """A message this sender holds for one attempt (`attempt`, counting from 1)."""

    id: str
    job_id: str
    event: str
    url: str
    payload: dict[str, Any]
    attempt: int


def _due() -> Any:
    return (
        (WebhookDelivery.state == DeliveryState.pending)
        & (WebhookDelivery.next_attempt_at <= db_now())
        & (WebhookDelivery.locked_until.is_(None) | (WebhookDelivery.locked_until < db_now()))
    )


# Built once: every API and worker process looks for due messages every `webhook_poll_seconds`,
# beside trainings on the same cores, and almost always finds none.
_DUE = (
    select(WebhookDelivery.id, WebhookDelivery.attempts)
    .where(_due())
    .order_by(WebhookDelivery.next_attempt_at)
    .limit(bindparam("limit"))
)


def claim_due(session: Session, *, limit: int, hold_seconds: float) -> list[Claimed]:
    """Take up to `limit` due messages for one attempt each, held for `hold_seconds`; the caller
    commits before sending."""
    rows = session.execute(_DUE, {"limit": limit}).all()
    claimed = []
    for delivery_id, attempts in rows:
        # Conditional on what was read: of two senders that read the same row, one wins.
        won = changed(
            session,
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts, _due())
            .values(attempts=attempts + 1, locked_until=db_now(hold_seconds)),
        )
        if won:
            row = session.get_one(WebhookDelivery, delivery_id)
            claimed.append(
                Claimed(
                    id=row.id,
                    job_id=row.job_id,
                    event=row.event,
                    url=row.url,
                    payload=row.payload,
                    attempt=attempts + 1,
                )
            )
    return claimed


def _held(delivery_id: str, attempt: int) -> Any:
    # Only the sender of this attempt records its result: one whose hold lapsed and whose message
    # another sender took meanwhile (a higher attempt) changes nothing.
    return (
        (WebhookDelivery.id == delivery_id)
        & (WebhookDelivery.attempts == attempt)
        & (WebhookDelivery.state == DeliveryState.pending)
    )


def mark_delivered(session: Session, *, delivery_id: str, attempt: int, status_code: int) -> bool:
    """The receiver answered 2xx; False when this attempt did not hold the message any more."""
    return bool(
        changed(
            session,
            update(WebhookDelivery)
            .where(_held(delivery_id, attempt))
            .values(
                state=DeliveryState.delivered,
                last_status_code=status_code,
                last_error=None,
                locked_until=None,
                completed_at=utcnow(),
            ),
        )
    )


def backoff_seconds(attempt: int, *, base: float, cap: float) -> float:
    """The wait after failed attempt `attempt` (1, 2, ...): `base` doubling each time up to `cap`,
    with full jitter in its upper half, so receivers that come back are not hit all at once."""
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def mark_failed_attempt(
    session: Session,
    *,
    delivery_id: str,
    attempt: int,
    error: str,
    status_code: int | None,
    retry_in: float | None,
) -> DeliveryState | None:
    """An attempt failed: try again in `retry_in` seconds, or (None) give up. Returns the message's
    new state; None when this attempt did not hold the message any more."""
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error, "locked_until": None}
    if retry_in is None:
        state = DeliveryState.failed
        values.update(state=state, completed_at=utcnow())
    else:
        state = DeliveryState.pending
        values.update(next_attempt_at=db_now(retry_in))
    done = changed(session, update(WebhookDelivery).where(_held(delivery_id, attempt)).values(**values))
    return state if done else None


def of_job(session: Session, *, job_id: str) -> Sequence[WebhookDelivery]:
    """A job's messages, oldest first."""
    return session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.sequence)
    ).all()
