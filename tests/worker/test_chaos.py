"""The chaos suite: long jobs survive kills, pauses, outages and full disks, and run exactly once.

A service of its own per backend with short leases (`CHAOS_SETTINGS`), two workers (the one
`sgjobs serve` keeps alive and one started here), real trainings of a few epochs, real signals.
Faults that cannot be made from outside (a kill in the middle of a checkpoint write, a full disk)
are injected at named points in the training process (`app.failpoints`), armed per job name.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.testing import (
    Backend,
    RunningService,
    backend_resources,
    serve,
    service_env,
    start_worker,
    worker_process,
)
from tests.conftest import PG_ADMIN_URL
from tests.support import Service, make_shapes, make_unreadable_dataset, tiny_spec

pytestmark = pytest.mark.slow
# With pytest-xdist the tests are spread one by one (see tests/conftest.py): each is long, and the
# module's fixture is only a service, cheap to start on both workers.
XDIST_SPREAD = True

# A Redis database of its own, so that flushing it (a broker losing its data) touches no other test.
CHAOS_REDIS_URL = "redis://127.0.0.1:6379/5"
LEASE_SECONDS = 4.0
# `checkpoint_write`'s epoch counts the epochs completed (2: the checkpoint after the second epoch,
# so the first one's is on disk); `train_batch`'s is SG's 0-based epoch index and batch index.
FAILPOINTS = {
    "checkpoint_write": [
        {"action": "kill", "job_name": "ckpt-kill", "attempt": 1, "epoch": 2},
        {"action": "enospc", "job_name": "full-disk", "epoch": 2},
    ],
    "train_batch": {"action": "abort", "job_name": "crasher", "batch": 1},
}
CHAOS_SETTINGS: dict[str, object] = {
    "device": "cpu",
    "heartbeat_seconds": 0.5,
    "report_interval_seconds": 0.2,
    "cancel_grace_seconds": 60,
    "lease_seconds": LEASE_SECONDS,
    # A process paused between a write and its commit keeps its job's row locked this long at most
    # (PostgreSQL; tests/test_db.py): then a sweeper can expire its lease.
    "db_lock_idle_seconds": 10,
    "sweep_interval_seconds": 0.5,
    "resend_after_seconds": 3,
    # Redis hands the message of a running job to the other worker every few seconds (jobs here run
    # longer): the redelivery must find the job claimed and do nothing.
    "broker_visibility_timeout_seconds": 3,
    # As the shared test services (tests/conftest.py): no onnxruntime export per success, no model
    # warmer and no spare training process per worker. On 2 CPU cores each spare's import (seconds,
    # at every worker start and after every training) competes with the trainings the chaos runs.
    "serving_export": False,
    "predict_warm": False,
    "training_spare": False,
}
EPOCHS = 3
# A dataset folder whose annotations cannot be read: its jobs fail at the dataset check.
BROKEN = {"format": "coco", "path": "chaos-broken"}


@dataclass
class Chaos:
    """A running service, its settings and environment, and the extra workers started for it."""

    backend: Backend
    running: RunningService
    service: Service
    env: dict[str, str]
    cwd: Path
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """One more `sgjobs worker` on the same database and broker."""
        log = self.running.home / f"worker-{len(self.extra)}.log"
        proc = start_worker(self.env, cwd=self.cwd, log=log)
        self.extra.append(proc)
        return proc

    def workers(self) -> list[psutil.Process]:
        """The live Celery worker processes (serve's and the extra ones)."""
        roots = [
            psutil.Process(self.running.pid),
            *(psutil.Process(p.pid) for p in self.extra if p.poll() is None),
        ]
        found = []
        for root in roots:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    if (
                        "worker.celery_app" in " ".join(proc.cmdline())
                        and proc.status() != psutil.STATUS_ZOMBIE
                    ):
                        found.append(proc)
                except psutil.NoSuchProcess:
                    pass
        return found

    def worker_of(self, job: dict[str, Any]) -> psutil.Process:
        """The worker process that runs the job's current attempt."""
        pid = worker_process(job["worker"])
        assert pid is not None, f"no worker process named {job['worker']}"
        return psutil.Process(pid)

    def trainer(self, job_id: str) -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "worker.train_process" in cmdline and job_id in cmdline:
                return proc
        return None


@pytest.fixture(scope="module")
def chaos(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    home = tmp_path_factory.mktemp(f"chaos-{backend.name}")
    settings = {**CHAOS_SETTINGS, "failpoints": json.dumps(FAILPOINTS)}
    with (
        backend_resources(
            backend.name, prefix="sgjobs-chaos", pg_admin_url=PG_ADMIN_URL, redis_url=CHAOS_REDIS_URL
        ) as own,
        serve(own, home.name, cwd=home.parent, settings=settings) as running,
        httpx.Client(base_url=running.base_url, headers=running.headers, timeout=30) as client,
    ):
        service = Service(
            backend.name, running.base_url, running.home, running.home / "datasets", running.log_file, client
        )
        make_shapes(service.datasets_dir, "chaos", splits=(("train", 6), ("valid", 2)))
        make_unreadable_dataset(service.datasets_dir, BROKEN["path"])
        chaos = Chaos(own, running, service, service_env(own, home.name, **settings), home.parent)
        chaos.start_worker()
        _wait_for(lambda: len(chaos.workers()) == 2, "two workers", 60)
        try:
            yield chaos
        finally:
            for proc in chaos.extra:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _wait_for(condition: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _spec(name: str, epochs: int = EPOCHS, **overrides: Any) -> dict[str, Any]:
    # 6 images in batches of 2: three batches per epoch, a checkpoint at every epoch's end.
    return tiny_spec("chaos", name=name, training={"max_epochs": epochs, "batch_size": 2}, **overrides)


def _in_epoch(chaos: Chaos, job_id: str, epoch: int, batch: int = 1) -> dict[str, Any]:
    """Wait until the job has finished `batch` batches of (0-based) `epoch`."""
    return chaos.service.wait_until(
        job_id,
        lambda j: (
            j["status"] == "running"
            and ((j["progress"]["epoch"] or 0), (j["progress"]["batch"] or 0)) >= (epoch, batch)
        ),
        timeout=300,
    )


def _assert_one_point_per_epoch(service: Service, job_id: str, epochs: int) -> None:
    """Every per-epoch series has exactly epochs 0..n-1; per-batch steps are never doubled."""
    points = service.metrics(job_id)
    per_epoch: dict[str, list[int]] = {}
    steps: dict[str, list[int]] = {}
    for p in points:
        if p["step"] is not None:
            steps.setdefault(p["name"], []).append(p["step"])
        elif p["name"].startswith(("Train_", "Valid_")):
            per_epoch.setdefault(p["name"], []).append(p["epoch"])
    assert per_epoch and steps
    for name, epochs_seen in per_epoch.items():
        assert sorted(epochs_seen) == list(range(epochs)), (name, epochs_seen)
    for name, seen in steps.items():
        doubled = [s for s, n in Counter(seen).items() if n > 1]
        assert not doubled, (name, doubled)
        assert sorted(seen) == list(range(epochs * 3)), (name, sorted(seen))


def _states(service: Service, job_id: str) -> list[str]:
    return [e["message"] for e in service.events(job_id) if e["kind"] == "state"]


def test_kill_9_of_the_worker_mid_epoch_resumes_on_a_restarted_worker(chaos: Chaos) -> None:
    service = chaos.service
    # Only serve's worker takes jobs here, so the resumed attempt can only run on the worker that
    # serve starts again in place of the killed one.
    extra = [p for p in chaos.extra if p.poll() is None]
    for proc in extra:
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        job = service.submit(_spec("kill-9"))
        batch = random.randint(1, 2)
        running = _in_epoch(chaos, job["id"], epoch=1, batch=batch)
        worker = chaos.worker_of(running)
        os.kill(worker.pid, signal.SIGKILL)
        done = service.wait(job["id"], timeout=300)
    finally:
        for proc in extra:
            os.killpg(proc.pid, signal.SIGCONT)
    assert done["status"] == "succeeded", (done, _states(service, job["id"]))
    assert done["restarts"] == 1 and done["attempt"] == 2
    states = _states(service, job["id"])
    assert any("attempt 1 on" in s and "lease expired" in s and "restart 1 of 2" in s for s in states), states
    logs = [e["message"] for e in service.events(job["id"])]
    assert any(m.startswith("attempt 2 resumes from ckpt_latest.pth at epoch 2/3") for m in logs), logs
    _assert_one_point_per_epoch(service, job["id"], EPOCHS)
    assert done["worker"] != running["worker"]  # serve started a worker again in place of the killed one
    _wait_for(lambda: len(chaos.workers()) == 2, "two workers", 60)


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(chaos: Chaos) -> None:
    service = chaos.service
    job = service.submit(_spec("ckpt-kill"))
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, _states(service, job["id"]))
    assert done["restarts"] == 1
    logs = [e["message"] for e in service.events(job["id"])]
    assert any("killed by SIGKILL" in m for m in logs), logs
    # The checkpoint being written (epoch 1) was lost; epoch 0's was intact and resumed from.
    assert any(m.startswith("attempt 2 resumes from") and "at epoch 2/3" in m for m in logs), logs
    _assert_one_point_per_epoch(service, job["id"], EPOCHS)
    leftovers = [p.name for p in Path(done["job_dir"]).rglob("*") if "tmp" in p.name]
    assert not leftovers, leftovers


def test_a_paused_worker_past_its_lease_writes_nothing_more(chaos: Chaos) -> None:
    service = chaos.service
    job = service.submit(_spec("paused"))
    running = _in_epoch(chaos, job["id"], epoch=1)
    worker = chaos.worker_of(running)
    trainer = chaos.trainer(job["id"])
    assert trainer is not None
    paused = [worker, trainer]
    for proc in paused:
        proc.send_signal(signal.SIGSTOP)
    try:
        taken = service.wait_until(
            job["id"], lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=120
        )
        assert taken["worker"] != running["worker"]
        before = service.job(job["id"])
    finally:
        for proc in paused:
            proc.send_signal(signal.SIGCONT)
    # The old training notices at its next write that the job moved on, and exits without writing.
    trainer.wait(timeout=60)
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["restarts"] == 1, done
    assert done["worker"] == taken["worker"] and before["worker"] == taken["worker"]
    _assert_one_point_per_epoch(service, job["id"], EPOCHS)
    console = (Path(done["job_dir"]) / "console.log").read_text(errors="replace")
    assert "moved on from attempt 1: stopping without writing anything more" in console, console[-3000:]


def test_a_job_that_crashes_every_time_fails_after_max_restarts_and_others_run(chaos: Chaos) -> None:
    service = chaos.service
    crasher = service.submit(_spec("crasher", max_restarts=1))
    other = service.submit(_spec("bystander", epochs=1))
    failed = service.wait(crasher["id"], timeout=300)
    assert failed["status"] == "failed" and failed["error"]["reason"] == "worker_lost", failed
    assert failed["attempt"] == 2 and failed["restarts"] == 1
    assert "SIGABRT" in failed["error"]["message"] and "max_restarts 1" in failed["error"]["message"]
    attempts = [e for e in service.events(crasher["id"]) if (e.get("data") or {}).get("attempt")]
    assert {e["data"]["attempt"] for e in attempts} == {1, 2}
    assert service.wait(other["id"], timeout=300)["status"] == "succeeded"


def test_a_full_disk_on_save_fails_the_job_as_disk_full(chaos: Chaos) -> None:
    service = chaos.service
    job = service.submit(_spec("full-disk"))
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "failed" and done["error"]["reason"] == "disk_full", done
    assert "space" in done["error"]["message"].lower()
    assert done["restarts"] == 0
    # The previous (epoch 0) checkpoint is intact.
    latest = Path(done["artifacts"]["ckpt_latest"])
    assert latest.stat().st_size > 1_000_000


def test_cancel_then_resume_trains_on_from_the_checkpoint(chaos: Chaos) -> None:
    service = chaos.service
    job = service.submit(_spec("resume"))
    _in_epoch(chaos, job["id"], epoch=1)
    assert service.client.post(f"/jobs/{job['id']}/cancel").status_code == 202
    assert service.wait(job["id"])["status"] == "cancelled"
    response = service.client.post(f"/jobs/{job['id']}/resume", json={"max_epochs": EPOCHS + 1})
    assert response.status_code == 202, response.text
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert (
        done["progress"]["max_epochs"] == EPOCHS + 1 and done["spec"]["training"]["max_epochs"] == EPOCHS + 1
    )
    _assert_one_point_per_epoch(service, job["id"], EPOCHS + 1)


def test_sigterm_hands_the_job_back_for_another_worker(chaos: Chaos) -> None:
    service = chaos.service
    job = service.submit(_spec("sigterm"))
    running = _in_epoch(chaos, job["id"], epoch=1)
    worker = chaos.worker_of(running)
    worker.send_signal(signal.SIGTERM)
    handed = service.wait_until(job["id"], lambda j: j["attempt"] == 2, timeout=120)
    assert handed["restarts"] == 0
    worker.wait(timeout=60)  # the worker exits once it has handed its job back
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["restarts"] == 0, done
    assert any("handed back" in s for s in _states(service, job["id"]))
    _assert_one_point_per_epoch(service, job["id"], EPOCHS)
    if worker.pid in {p.pid for p in chaos.extra}:
        chaos.start_worker()  # serve keeps only its own worker alive
    _wait_for(lambda: len(chaos.workers()) == 2, "two workers", 60)


def test_readyz_says_when_no_worker_was_seen_recently(chaos: Chaos) -> None:
    workers = chaos.workers()
    for proc in workers:
        proc.send_signal(signal.SIGSTOP)
    try:
        _wait_for(
            lambda: chaos.service.client.get("/readyz").status_code == 503,
            "readyz to say no worker",
            LEASE_SECONDS * 5,
        )
        body = chaos.service.client.get("/readyz").json()
        assert body["checks"]["workers"].startswith("error: no worker seen for"), body
        assert body["checks"]["database"] == "ok" and body["checks"]["broker"] == "ok"
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGCONT)
    _wait_for(lambda: chaos.service.client.get("/readyz").status_code == 200, "readyz ok again", 30)


@pytest.mark.backends("postgres")
def test_postgres_connections_terminated_and_refused_mid_training(chaos: Chaos) -> None:
    import psycopg

    service = chaos.service
    job = service.submit(_spec("pg-terminate"))
    _in_epoch(chaos, job["id"], epoch=0)
    database = str(chaos.backend.database_url).rsplit("/", 1)[1]
    terminate = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()"
    )
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for _ in range(3):
            conn.execute(terminate, (database,))
            time.sleep(1.0)
        # The database is down for the service (shorter than a lease): the API says 503, never 500.
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            conn.execute(terminate, (database,))
            response = service.client.get(f"/jobs/{job['id']}")
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            assert response.headers["content-type"].startswith("application/problem+json")
        finally:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded" and done["restarts"] == 0, (done, _states(service, job["id"]))
    _assert_one_point_per_epoch(service, job["id"], EPOCHS)


@pytest.mark.backends("postgres")
def test_redis_flushed_with_jobs_queued_and_running_all_run_once(chaos: Chaos) -> None:
    """Also: the running jobs last longer than the broker's visibility timeout, and still run once."""
    import redis

    service = chaos.service
    running = [service.submit(_spec(f"flush-running-{i}", epochs=2)) for i in range(2)]
    for job in running:
        service.wait_until(job["id"], lambda j: j["status"] == "running", timeout=120)
    # What matters for the queued ones is that each is claimed once: they fail at their dataset
    # check, in seconds, instead of training.
    queued = [service.submit(_spec(f"flush-queued-{i}", epochs=1, dataset=BROKEN)) for i in range(20)]
    client = redis.Redis.from_url(CHAOS_REDIS_URL)
    try:
        assert client.llen(chaos.backend.queue) > 0
        client.flushdb()
    finally:
        client.close()
    for job in [*running, *queued]:
        done = service.wait(job["id"], timeout=600)
        assert done["attempt"] == 1, done
        expected = ("succeeded", None) if job in running else ("failed", "dataset_error")
        assert (done["status"], (done["error"] or {}).get("reason")) == expected, done
        claims = [s for s in _states(service, job["id"]) if "running on" in s]
        assert len(claims) == 1, claims
