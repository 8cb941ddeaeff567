"""Worker presence: heartbeats written by each worker, read by `/readyz` and the sweeper."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from app.db import changed, db_now
from app.workers.models import Worker


def seen(session: Session, *, name: str, job_id: str | None) -> None:
    """Record that worker `name` is alive now (and which job it trains)."""
    if not changed(
        session, update(Worker).where(Worker.name == name).values(seen_at=db_now(), job_id=job_id)
    ):
        session.execute(
            insert(Worker).values(name=name, started_at=db_now(), seen_at=db_now(), job_id=job_id)
        )


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
