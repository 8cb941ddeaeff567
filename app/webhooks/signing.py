"""The key webhooks are signed with, and the signature: HMAC-SHA256 over the exact body bytes.

The key is `SGJOBS_WEBHOOK_SECRET`; without it the first process that needs one makes a random key
and writes it to `$SGJOBS_HOME/webhook.secret` (mode 0600), where every process sharing that home
(the API and its workers) reads it, and where the operator finds it to give to receivers. Processes
that do not share a home must all be given `SGJOBS_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from app.settings import Settings

logger = logging.getLogger(__name__)

SECRET_FILE = "webhook.secret"
SIGNATURE_HEADER = "X-Sgjobs-Signature"
DELIVERY_HEADER = "X-Sgjobs-Delivery"
EVENT_HEADER = "X-Sgjobs-Event"
TIMESTAMP_HEADER = "X-Sgjobs-Timestamp"


def secret_path(settings: Settings) -> Path:
    return settings.home / SECRET_FILE


def _make_secret_file(path: Path) -> None:
    """Write a new random key unless the file exists; of processes racing here one key wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    try:
        # A hard link fails when the name exists: an existing key is never replaced.
        os.link(tmp, path)
        logger.info("webhook signing key written to %s (mode 0600)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def secret(settings: Settings) -> bytes:
    """The signing key: `SGJOBS_WEBHOOK_SECRET`, else `$SGJOBS_HOME/webhook.secret` (made if missing)."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value().encode()
    path = secret_path(settings)
    if not path.is_file():
        _make_secret_file(path)
    return path.read_text().strip().encode()


def sign(key: bytes, body: bytes) -> str:
    """The `X-Sgjobs-Signature` value: `sha256=<hex of HMAC-SHA256(key, body)>`."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(key: bytes, body: bytes, signature: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(sign(key, body), signature)
