"""The workers seen by the service: each worker writes its row every sweep (database time)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class Worker(Base):
    __tablename__ = "workers"

    # Celery's node name: unique per worker process (`sgjobs@<host>-<pid>`).
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The job it trains now, if any (not a foreign key: a deleted job must not block the heartbeat).
    job_id: Mapped[str | None] = mapped_column(String(32))
