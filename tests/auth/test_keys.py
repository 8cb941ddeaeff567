"""API keys: bootstrap, the CLI's lifecycle (create, use, list, revoke, 401 after), and what needs one."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.auth import service as auth
from app.auth.models import ApiKey
from app.db import session_scope
from app.migrate import upgrade
from app.settings import Settings
from tests.auth.helpers import client_for, make_key, sgjobs
from tests.support import Service

pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_the_service_writes_its_admin_key_0600(service: Service) -> None:
    path = service.home / auth.ADMIN_KEY_FILE
    assert path.read_text().strip() == service.admin_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "admin API key" in service.log_file.read_text()


def test_without_a_key_only_health_answers(service: Service) -> None:
    with client_for(service, None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/datasets"), ("POST", "/predict")):
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == 'Bearer realm="sgjobs"'
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "unauthorized"
    with client_for(service, "sgj_" + "x" * 43) as wrong:
        response = wrong.get("/jobs")
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    with client_for(service, None) as basic:
        response = basic.get("/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert response.status_code == 401


def test_openapi_declares_the_scheme(service: Service) -> None:
    schema = service.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            public = path in ("/healthz", "/readyz")
            assert ("security" in operation) != public, (method, path)
            assert ("401" in operation["responses"]) != public, (method, path)


def test_key_lifecycle_through_the_cli(service: Service, service_settings: Settings) -> None:
    done = sgjobs(service_settings, "keys", "create", "--tenant", "team-cli", "--name", "ci")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith(auth.KEY_PREFIX) and len(key) >= auth.MIN_KEY_LENGTH
    with client_for(service, key) as client:
        assert client.get("/jobs").status_code == 200

        listed = sgjobs(service_settings, "keys", "list")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "team-cli" in line)
        assert key not in listed.stdout and key[:12] in row and "member" in row
        key_id = row.split()[0]

        # Only the hash is stored.
        with session_scope(service_settings.database_url) as session:
            record = session.get(ApiKey, key_id)
            assert record is not None and record.key_hash == auth.hash_key(key)
            assert key not in (record.key_hash, record.prefix, record.name)

        revoked = sgjobs(service_settings, "keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        # The API trusts a key it checked for key_cache_seconds; after that a revoked one is refused.
        deadline = time.monotonic() + service_settings.key_cache_seconds + 5
        while (response := client.get("/jobs")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert "team-cli" not in sgjobs(service_settings, "keys", "list").stdout
    assert "(revoked)" in sgjobs(service_settings, "keys", "list", "--all").stdout


def test_cli_refuses_bad_tenant_names(service_settings: Settings) -> None:
    for bad in ("Team", "../x", "uploads", "_published", ""):
        done = sgjobs(service_settings, "keys", "create", "--tenant", bad)
        assert done.returncode == 2, (bad, done.stdout)
        assert "tenant" in done.stderr


def test_a_member_key_is_a_member(service: Service, service_settings: Settings) -> None:
    key = make_key(service_settings, "team-m")
    with client_for(service, key) as client:
        stats = client.get("/predict/stats").json()
        assert stats["pid"] is None and stats["cached_models"] == []


@pytest.mark.backends("sqlite")
def test_bootstrap_makes_one_admin_key(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    path = auth.bootstrap_admin_key(settings)
    assert path == settings.home / auth.ADMIN_KEY_FILE
    key = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Again: the existing key stays, no second one is made.
    assert auth.bootstrap_admin_key(settings) == path
    assert path.read_text().strip() == key
    with session_scope(settings.database_url) as session:
        assert len(session.scalars(select(ApiKey)).all()) == 1
        principal = auth.authenticate(session, key=key)
    assert principal is not None and principal.is_admin


@pytest.mark.backends("sqlite")
def test_bootstrap_takes_the_configured_key(tmp_path: Path) -> None:
    key = auth.generate_key()
    settings = Settings(home=tmp_path / "home", admin_key=key)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    path = auth.bootstrap_admin_key(settings)
    assert path is not None and path.read_text().strip() == key
    with session_scope(settings.database_url) as session:
        principal = auth.authenticate(session, key=key)
    assert principal is not None and principal.is_admin
    with pytest.raises(Exception, match="at least"):
        weak = Settings(home=tmp_path / "weak", admin_key="short")
        weak.ensure_dirs()
        upgrade(weak.database_url)
        auth.bootstrap_admin_key(weak)
