"""The workers seen by the service: each worker writes its row every sweep (database time)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
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
    # The pool it serves (SGJOBS_WORKER_QUEUE; "": the default pool) and how many GPUs its training
    # slot offers one job (1: one slot per GPU, or a CPU): POST /jobs refuses a spec's `gpus` beyond
    # what a live worker of the job's pool offers.
    queue: Mapped[str] = mapped_column(String(64), default="", server_default="")
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
