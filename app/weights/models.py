"""Registered weights: one row per distinct checkpoint file (by SHA-256)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id, utcnow


class WeightsSource(enum.StrEnum):
    upload = "upload"  # POST /weights with a file
    job = "job"  # promoted from a job's best checkpoint
    folder = "folder"  # a published file found in the weights folder (`pretrained` names it)


class Weights(Base):
    __tablename__ = "weights"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    # Folder weights belong to `app.auth.principal.PUBLISHED_TENANT`, which every tenant sees.
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(32))
    num_classes: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[str] | None] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The same file registered twice by one tenant is the same weights.
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    # The job a promoted checkpoint came from; the published dataset ("coco") of a folder file.
    job_id: Mapped[str | None] = mapped_column(String(32))
    pretrained: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    __table_args__ = (UniqueConstraint("tenant", "sha256"),)
