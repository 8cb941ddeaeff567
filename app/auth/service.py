"""API keys: create (shown once), authenticate, list, revoke; the first admin key at start."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Role
from app.auth.principal import DEFAULT_TENANT, TENANT_PATTERN, Principal
from app.db import session_scope, utcnow
from app.errors import Conflict, InvalidInput, NotFound
from app.paths import UPLOADS_FOLDER
from app.settings import ADMIN_KEY_FILE as ADMIN_KEY_FILE
from app.settings import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "sgj_"
# Shorter keys given in SGJOBS_ADMIN_KEY are refused: they could be guessed.
MIN_KEY_LENGTH = 32
# `last_used_at` is written at most this often per key, so reads do not turn into writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def admin_key_path(settings: Settings) -> Path:
    """Where the first admin key is written (mode 0600)."""
    return settings.admin_key_file


def generate_key() -> str:
    """A new key: 256 random bits, URL-safe, with a prefix that says what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not re.fullmatch(TENANT_PATTERN, tenant):
        raise InvalidInput(
            f"tenant {tenant!r} is not a valid name: lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 64 characters"
        )
    if tenant == UPLOADS_FOLDER:
        raise InvalidInput(f"tenant {tenant!r} is reserved (the datasets directory's folder of uploads)")
    return tenant


def create_key(
    session: Session, *, tenant: str, role: Role, name: str | None = None, key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key (or the given one) and return its record and the key itself, which is not
    stored and cannot be shown again."""
    check_tenant(tenant)
    key = key or generate_key()
    if len(key) < MIN_KEY_LENGTH:
        raise InvalidInput(f"an API key must have at least {MIN_KEY_LENGTH} characters")
    digest = hash_key(key)
    if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest)) is not None:
        raise Conflict("this key is already registered")
    record = ApiKey(key_hash=digest, prefix=key[:12], tenant=tenant, role=role.value, name=name)
    session.add(record)
    session.flush()
    return record, key


def authenticate(session: Session, *, key: str) -> Principal | None:
    """The principal of an active key, or None for an unknown or revoked one."""
    record = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if record is None:
        return None
    now = utcnow()
    if record.last_used_at is None or now - record.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == record.id).values(last_used_at=now))
    return Principal(key_id=record.id, tenant=record.tenant, role=Role(record.role))


def list_keys(session: Session, *, include_revoked: bool = False) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return session.scalars(query).all()


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke a key by its id (or its prefix, as `keys list` shows it); idempotent."""
    record = session.get(ApiKey, key_id) or session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
    if record is None:
        raise NotFound(f"no API key {key_id!r}")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.flush()
    return record


def _write_key_file(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def bootstrap_admin_key(settings: Settings) -> Path | None:
    """On start: make sure an admin key exists; a new one (or `SGJOBS_ADMIN_KEY`) is written to
    `$SGJOBS_HOME/admin.key`. Returns that file's path when it holds a usable key."""
    path = admin_key_path(settings)
    given = settings.admin_key.get_secret_value() if settings.admin_key else None
    with session_scope(settings.database_url) as session:
        if given is not None:
            found = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(given)))
            if found is None:
                create_key(
                    session, tenant=DEFAULT_TENANT, role=Role.admin, name="SGJOBS_ADMIN_KEY", key=given
                )
            elif found.revoked_at is not None or found.role != Role.admin:
                raise InvalidInput("SGJOBS_ADMIN_KEY names a revoked or non-admin key; set a new one")
            key = given
        else:
            active = session.scalar(
                select(ApiKey.id).where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None)).limit(1)
            )
            if active is not None:
                if path.is_file():
                    logger.info("the admin key is in %s", path)
                    return path
                logger.info("admin keys exist; create more with `sgjobs keys create --admin`")
                return None
            _, key = create_key(session, tenant=DEFAULT_TENANT, role=Role.admin, name="first admin key")
    _write_key_file(path, key)
    logger.info("admin key written to %s (mode 0600): send it as `Authorization: Bearer <key>`", path)
    return path
