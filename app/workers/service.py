"""Worker presence: heartbeats written by each worker, read by `/readyz` and the sweeper."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from app.db import changed, db_now
from app.workers.models import Worker


def seen(session: Session, *, name: str, job_id: str | None, queue: str = "", gpus: int = 1) -> None:
    """Record that worker `name` is alive now, which job it trains, the pool it serves (`queue`, ""
    the default one) and the GPUs its slot offers a job."""
    values = {"seen_at": db_now(), "job_id": job_id, "queue": queue, "gpus": gpus}
    if not changed(session, update(Worker).where(Worker.name == name).values(**values)):
        session.execute(insert(Worker).values(name=name, started_at=db_now(), **values))


def gone(session: Session, *, name: str) -> None:
    """Remove a worker that shuts down cleanly."""
    session.execute(delete(Worker).where(Worker.name == name))


def last_seen(session: Session) -> tuple[datetime | None, float | None]:
    """When any worker was last seen, and how many seconds ago (database clock); (None, None): never."""
    row = session.execute(select(func.max(Worker.seen_at), db_now())).one()
    latest, now = row
    if latest is None:
        return None, None
    return latest, max(0.0, (now - latest).total_seconds())


def forget_older_than(session: Session, *, seconds: float) -> int:
    """Drop rows of workers not seen for `seconds` (crashed without saying goodbye)."""
    return session.execute(delete(Worker).where(Worker.seen_at < db_now(-seconds))).rowcount  # type: ignore[attr-defined]


def largest_offer(session: Session, *, queue: str, within: float) -> int:
    """The most GPUs one worker of pool `queue` ("" the default one) seen within `within` seconds
    (database clock) offers a job; 0 when none of that pool is live."""
    return int(
        session.scalar(
            select(func.coalesce(func.max(Worker.gpus), 0)).where(
                Worker.queue == queue, Worker.seen_at >= db_now(-within)
            )
        )
        or 0
    )
