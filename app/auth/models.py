"""API keys: stored only as hashes; each carries a tenant and a role, and can be revoked."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id, utcnow


class Role(enum.StrEnum):
    admin = "admin"  # sees and acts on every tenant's objects, and the host details in answers
    member = "member"  # sees only its own tenant's objects


ROLE_CHECK = "role IN ({})".format(", ".join(f"'{r.value}'" for r in Role))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # SHA-256 of the whole key: a key is 256 random bits, so a fast hash is as strong as a slow one
    # and lets every request be checked with one indexed lookup.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, to tell keys apart in lists (never enough to use one).
    prefix: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (CheckConstraint(ROLE_CHECK, name="role"),)
