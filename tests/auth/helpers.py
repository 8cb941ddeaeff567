"""Keys and clients for tests that act as several tenants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from app.auth import service as auth
from app.auth.models import Role
from app.db import session_scope
from app.settings import Settings
from tests.support import Service

REPO = Path(__file__).resolve().parents[2]


def make_key(settings: Settings, tenant: str, *, admin: bool = False) -> str:
    """A new key of `tenant`, made in the service's database."""
    with session_scope(settings.database_url) as session:
        _, key = auth.create_key(session, tenant=tenant, role=Role.admin if admin else Role.member)
    return key


def client_for(service: Service, key: str | None) -> httpx.Client:
    """A client of the service sending `key` (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.Client(base_url=service.base_url, headers=headers, timeout=300)


def sgjobs(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The `sgjobs` command against the service's database."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**_clean_env(), **settings.as_env()},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
