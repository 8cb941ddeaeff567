"""Worker pools and GPU slots against the shared `sgjobs serve` on PostgreSQL + Redis.

Extra workers are started here (`sgjobs worker --queue`, `--gpus`) on pools of their own, so they
never take the other tests' jobs from the service's worker. No job here trains: every job reads a
dataset whose annotations are broken, so the worker that claims it fails it at the dataset check
within seconds (which is all it takes to see who claimed it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from sqlalchemy import select, update

from app import testing
from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Job, JobStatus
from app.queue import queue_for
from app.settings import Settings, gpu_ids
from app.testing import Backend, service_env
from app.workers.models import Worker
from tests.conftest import REDIS_URL, SERVICE_SETTINGS
from tests.support import Service, insert_job, make_unreadable_dataset, tiny_spec

pytestmark = pytest.mark.backends("postgres")

WorkerStarter = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    return make_unreadable_dataset(service.datasets_dir, "pools-bad")


@pytest.fixture
def start_worker(backend: Backend, service: Service) -> Iterator[WorkerStarter]:
    """`sgjobs worker ARGS` on the service's database, broker and home; stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **settings: object) -> subprocess.Popen[bytes]:
        env = service_env(backend, service.home.name, **{**SERVICE_SETTINGS, **settings})
        proc = testing.start_worker(
            env, cwd=service.home.parent, log=service.home / f"pool-worker-{len(started)}.log", args=args
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        testing.stop_worker(proc)


def _workers(settings: Settings, queue: str) -> list[tuple[str, str, int]]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Worker.name, Worker.queue, Worker.gpus).where(Worker.queue == queue).order_by(Worker.name)
        ).all()
    return [(name, q, gpus) for name, q, gpus in rows]


def _wait_workers(
    settings: Settings, queue: str, count: int, timeout: float = 90
) -> list[tuple[str, str, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _workers(settings, queue)
        if len(rows) >= count:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"{count} workers of pool {queue!r} did not show up: {_workers(settings, queue)}")


def _problem(response: Any, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert any(e["loc"][-1] == field for e in body["errors"]), body
    return body


def test_spec_queue_and_gpus_are_validated(service: Service, dataset: str) -> None:
    for bad in ("Big", "-big", "big.gpu", "x" * 64, ""):
        _problem(service.post_job(tiny_spec(dataset, queue=bad)), "queue")
    for bad_gpus in (0, 65):
        _problem(service.post_job(tiny_spec(dataset, gpus=bad_gpus)), "gpus")
    # The service's worker serves the default pool with one GPU (or CPU) per slot.
    body = _problem(service.post_job(tiny_spec(dataset, gpus=4)), "gpus")
    assert body["detail"] == "gpus: 4 requested, but the largest worker of pool 'default' offers 1 GPU"
    assert body["errors"][0]["loc"] == ["body", "gpus"]
    # No live worker in the pool: one GPU waits for a worker to start, more are refused.
    body = _problem(service.post_job(tiny_spec(dataset, queue="nobody-here", gpus=2)), "gpus")
    assert body["detail"] == "gpus: 2 requested, but the largest worker of pool 'nobody-here' offers 0 GPUs"


def test_resume_checks_gpus_again(service: Service, service_settings: Settings, dataset: str) -> None:
    # A failed job whose spec asks for more GPUs than its pool offers now (its workers changed).
    job_id = insert_job(service_settings, dataset, status=JobStatus.failed, finished_at=utcnow())
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(spec={**tiny_spec(dataset), "gpus": 3}))
    body = _problem(service.client.post(f"/jobs/{job_id}/resume"), "gpus")
    assert body["detail"] == "gpus: 3 requested, but the largest worker of pool 'default' offers 1 GPU"


def test_a_job_for_a_pool_without_workers_waits_on_its_own_queue(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job = service.submit(tiny_spec(dataset, queue="nobody-here"))
    assert job["status"] == "queued" and job["spec"]["queue"] == "nobody-here" and job["spec"]["gpus"] == 1
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.llen(queue_for(service_settings, "nobody-here")) >= 1
    finally:
        client.close()
    time.sleep(2)  # two sweeps of the service's worker: it does not take the job
    assert service.job(job["id"])["status"] == "queued"
    assert service.client.post(f"/jobs/{job['id']}/cancel").status_code == 202


def test_an_idle_worker_resends_only_its_own_pools_jobs(service_settings: Settings, dataset: str) -> None:
    job_id = insert_job(service_settings, dataset, spec=tiny_spec(dataset, queue="nobody-else"))
    try:
        with session_scope(service_settings.database_url) as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1))
            )
        with session_scope(service_settings.database_url) as session:
            assert job_id not in lifecycle.send_candidates(session, resend_after=60, pool="")
            assert job_id in lifecycle.send_candidates(session, resend_after=60, pool="nobody-else")
            assert job_id not in lifecycle.send_candidates(session, resend_after=None, pool="nobody-else")
    finally:
        with session_scope(service_settings.database_url) as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.cancelled, finished_at=utcnow())
            )


def test_jobs_are_claimed_by_a_worker_of_their_pool(
    service: Service, service_settings: Settings, dataset: str, start_worker: WorkerStarter
) -> None:
    (default_name, _, default_gpus), *_ = _wait_workers(service_settings, "", 1)
    assert default_gpus == 1
    proc = start_worker("--queue", "big")
    [(big_name, queue, gpus)] = _wait_workers(service_settings, "big", 1)
    assert (queue, gpus) == ("big", 1)

    body = _problem(service.post_job(tiny_spec(dataset, queue="big", gpus=2)), "gpus")
    assert body["detail"] == "gpus: 2 requested, but the largest worker of pool 'big' offers 1 GPU"

    big = service.submit(tiny_spec(dataset, queue="big"))
    plain = service.submit(tiny_spec(dataset))
    big_done = service.wait(big["id"], timeout=300)
    plain_done = service.wait(plain["id"], timeout=300)
    assert big_done["error"]["reason"] == "dataset_error", big_done
    assert plain_done["error"]["reason"] == "dataset_error", plain_done
    assert big_done["worker"] == big_name
    assert plain_done["worker"] != big_name and plain_done["worker"].startswith("sgjobs@")

    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert _workers(service_settings, "big") == []  # said goodbye


def test_gpus_starts_one_worker_process_per_gpu(
    service_settings: Settings, start_worker: WorkerStarter
) -> None:
    # The pool from SGJOBS_WORKER_QUEUE this time (and its own, so it takes no other test's job).
    proc = start_worker("--gpus", "0,1", worker_queue="gpu-slots")
    rows = _wait_workers(service_settings, "gpu-slots", 2)
    assert [(q, g) for _, q, g in rows] == [("gpu-slots", 1), ("gpu-slots", 1)]
    children = [
        p for p in psutil.Process(proc.pid).children() if "worker.celery_app" in " ".join(p.cmdline())
    ]
    assert len(children) == 2
    visible = sorted(p.environ().get("CUDA_VISIBLE_DEVICES", "") for p in children)
    assert visible == ["0", "1"]

    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    assert _workers(service_settings, "gpu-slots") == []


def test_gpus_per_slot_groups_the_gpus_of_each_worker_process(
    service: Service, service_settings: Settings, dataset: str, start_worker: WorkerStarter
) -> None:
    proc = start_worker("--gpus", "0,1,2,3", "--gpus-per-slot", "2", worker_queue="gpu-pairs")
    rows = _wait_workers(service_settings, "gpu-pairs", 2)
    assert [(q, g) for _, q, g in rows] == [("gpu-pairs", 2), ("gpu-pairs", 2)]
    children = [
        p for p in psutil.Process(proc.pid).children() if "worker.celery_app" in " ".join(p.cmdline())
    ]
    assert sorted(p.environ().get("CUDA_VISIBLE_DEVICES", "") for p in children) == ["0,1", "2,3"]
    # Each consumes its pool's queues of one- and two-GPU jobs.
    base = service_settings.task_queue
    for child in children:
        cmdline = child.cmdline()
        assert cmdline[cmdline.index("--queues") + 1] == f"{base}.gpu-pairs,{base}.gpu-pairs.gpus2"
    body = _problem(service.post_job(tiny_spec(dataset, queue="gpu-pairs", gpus=4)), "gpus")
    assert body["detail"] == "gpus: 4 requested, but the largest worker of pool 'gpu-pairs' offers 2 GPUs"

    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    assert _workers(service_settings, "gpu-pairs") == []


def test_worker_options_are_checked(tmp_path: Path) -> None:
    assert gpu_ids(" 0, 1,3 ") == ["0", "1", "3"]
    for bad in ("0,0", "a", "0;1"):
        with pytest.raises(ValueError):
            gpu_ids(bad)
    with pytest.raises(ValueError):
        Settings(worker_queue="Big")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--queue", "Not a pool"],
        env={**env, "SGJOBS_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "worker_queue" in done.stderr, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--gpus", "0,1,2", "--gpus-per-slot", "2"],
        env={**env, "SGJOBS_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "lists 3 GPUs, not a multiple of worker_gpus_per_slot 2" in done.stderr, done.stderr
