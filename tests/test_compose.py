"""Static checks of docker-compose.yml, the Dockerfile and .dockerignore (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml with YAML merge keys resolved (as Compose does)."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `services` mapping."""
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "redis", "s3", "s3-bucket", "migrate", "api", "worker"}


def test_postgres_and_redis(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["environment"]["POSTGRES_DB"] == "sgjobs"
    assert redis["image"] == "redis:7"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    declared = set(compose["volumes"])
    for service in (postgres, redis):
        for volume in service["volumes"]:
            assert volume.split(":")[0] in declared


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("migrate", ["sgjobs", "migrate"]),
        ("api", ["sgjobs", "api", "--host", "0.0.0.0", "--port", "8000"]),
        ("worker", ["sgjobs", "worker"]),
    ],
)
def test_commands(services: dict[str, dict[str, Any]], service: str, command: list[str]) -> None:
    assert services[service]["command"] == command


def test_app_services_share_nothing_but_database_queue_and_store(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"] == "." and service["image"] == "sg-jobs:latest"
        env = service["environment"]
        assert env["SGJOBS_DATABASE_URL"] == "postgresql+psycopg://sgjobs:sgjobs@postgres:5432/sgjobs"
        assert env["SGJOBS_BROKER_URL"] == "redis://redis:6379/0"
        assert env["SGJOBS_HOME"] == "/data"
        assert env["SGJOBS_STORAGE_URL"].startswith("s3://sgjobs/")
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert len(env["SGJOBS_WEBHOOK_SECRET"]) >= 16  # one signing key for every machine
        # Each container (each replica of a scaled worker) has a home of its own: an anonymous volume.
        assert "/data" in service["volumes"]
        assert not any(v.split(":")[-1] == "/data" and ":" in v for v in service["volumes"])
        # Datasets and registered weights are still one shared volume (not yet in the store).
        assert env["SGJOBS_DATASETS_DIR"].startswith("/shared/") and env["SGJOBS_WEIGHTS_DIR"].startswith(
            "/shared/"
        )
        assert "sgjobs-shared:/shared" in service["volumes"]


def test_the_store_and_its_bucket(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    s3, bucket = services["s3"], services["s3-bucket"]
    assert "-s3" in s3["command"] and "-s3.port=8333" in s3["command"]
    assert "healthz" in " ".join(s3["healthcheck"]["test"]) and "ports" not in s3
    bucket_name = services["api"]["environment"]["SGJOBS_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert f"s3.bucket.create -name {bucket_name}" in " ".join(bucket["command"])
    assert bucket["restart"] == "no"
    # The identity the store accepts is the one the services use.
    identity = yaml.safe_load(compose["configs"]["s3-identities"]["content"])["identities"][0]
    env = services["worker"]["environment"]
    assert identity["credentials"] == [
        {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}
    ]


def test_workers_scale(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    # `docker compose up --scale worker=N` needs replicas that name no fixed container or host port.
    assert "container_name" not in worker and "ports" not in worker


def test_database_url_matches_postgres_credentials(services: dict[str, dict[str, Any]]) -> None:
    pg = services["postgres"]["environment"]
    url = services["api"]["environment"]["SGJOBS_DATABASE_URL"]
    credentials = f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
    expected = f"postgresql+psycopg://{credentials}@postgres:5432/{pg['POSTGRES_DB']}"
    assert url == expected


def test_dependencies(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"  # one-shot: must not loop after success
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["redis"] == {"condition": "service_healthy"}
        assert depends["s3-bucket"] == {"condition": "service_completed_successfully"}


def test_api_port(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["ports"] == ["8000:8000"]
    assert "ports" not in services["worker"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_worker_reserves_one_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["api"]


def test_dockerfile_installs_from_the_lock() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    lock_install = next(i for i, r in enumerate(runs) if "pip install --no-deps -r requirements.lock" in r)
    project_install = next(i for i, r in enumerate(runs) if re.search(r"pip install --no-deps .*\.(\s|$)", r))
    assert lock_install < project_install  # dependencies in their own, cacheable layer
    assert copies[0].startswith("requirements.lock")
    assert any("libglib2.0-0" in r for r in runs)
    lock = (ROOT / "requirements.lock").read_text()
    if "opencv-python==" in lock:  # the non-headless wheel needs libGL at import time
        assert any("libgl1" in r for r in runs)
    assert not any(re.search(r"pip install (?!--no-deps)", r) for r in runs)


def test_dockerfile_uses_the_sgjobs_entrypoint() -> None:
    instructions = dockerfile_instructions()
    cmd = [args for instruction, args in instructions if instruction == "CMD"]
    assert len(cmd) == 1 and cmd[0].startswith('["sgjobs", "serve"')
    assert ("USER", "sgjobs") in instructions
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^sgjobs = "app\.cli:main"$', pyproject, re.MULTILINE)


def test_dockerignore_excludes_local_state() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in ("", "#")
    }
    for required in (".venv", "var/", ".env", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".git"):
        assert required in entries
    assert "requirements.lock" not in entries
