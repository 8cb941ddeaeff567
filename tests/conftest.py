"""Session fixtures: a throwaway database and broker per backend, and a real `sgjobs serve`.

Tests that use `service` run once per backend: SQLite with the embedded SQLite broker, and
PostgreSQL with Redis (both must be running on 127.0.0.1, as on the CI machine). A test marked
`@pytest.mark.backends("sqlite")` runs on the listed backends only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app.settings import Settings
from tests.support import Service

PG_ADMIN_URL = os.environ.get("SGJOBS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SGJOBS_TEST_REDIS", "redis://127.0.0.1:6379/0")
ALL_BACKENDS = ("sqlite", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run only on these backends")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else ALL_BACKENDS
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@dataclass(frozen=True)
class Backend:
    name: str
    database_url: str | None
    broker_url: str | None
    queue: str


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    name: str = request.param
    run = uuid.uuid4().hex[:10]
    queue = f"sgjobs-test-{run}"
    if name == "sqlite":
        # The embedded defaults: a SQLite file and the SQLite broker, both in SGJOBS_HOME.
        yield Backend(name, None, None, queue)
        return
    database = f"sgjobs_test_{run}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    try:
        yield Backend(name, url, REDIS_URL, queue)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        keys = [queue, *client.keys(f"*{queue}*")]
        client.delete(*keys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(backend: Backend, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    env.update(
        {
            # Relative, as in the README's default (`./var`): every process must resolve it the same.
            "SGJOBS_HOME": home.name,
            "SGJOBS_TASK_QUEUE": backend.queue,
            "SGJOBS_DEVICE": "cpu",
            "SGJOBS_HEARTBEAT_SECONDS": "1",
            "SGJOBS_REPORT_INTERVAL_SECONDS": "0.2",
            "SGJOBS_CANCEL_GRACE_SECONDS": "60",
        }
    )
    if backend.database_url:
        env["SGJOBS_DATABASE_URL"] = backend.database_url
    if backend.broker_url:
        env["SGJOBS_BROKER_URL"] = backend.broker_url
    return env


@pytest.fixture(scope="session")
def service_settings(backend: Backend, service: Service) -> Settings:
    """Settings pointing at the running service's database and broker, for direct access."""
    return Settings(
        home=service.home,
        database_url=backend.database_url,
        broker_url=backend.broker_url,
        task_queue=backend.queue,
    )


@pytest.fixture(scope="session")
def service(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`sgjobs serve` in a child process: migrations, the API on a free port, one Celery worker."""
    home = tmp_path_factory.mktemp(f"sgjobs-{backend.name}")
    port = _free_port()
    log_file = home / "serve.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=service_env(backend, home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home.parent,
        )
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base_url, timeout=30)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sgjobs serve did not start:\n{log_file.read_text()}")
        time.sleep(0.3)
    try:
        yield Service(backend.name, base_url, home, home / "datasets", log_file, client)
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
