"""Three workers, a dozen jobs, one queue: every job runs exactly once (issue 14).

Three `sgjobs worker` commands serve a pool of their own on the shared PostgreSQL + Redis service:
two with one training slot each and one with `--gpus 0,1` (two slots, each its own Celery process).
Fifteen jobs go to that pool at once: twelve short ones that must all succeed, two long ones that are
cancelled while they train on two different slots, and one cancelled before any worker takes it.

What must hold, watched from outside (the API, the database, the process table):
- each short job succeeded in its first attempt, with one "running" event and one training process;
- no slot ever ran two training processes at once, and its jobs' run times never overlap;
- every slot trained (the queue is shared, not sticky);
- a cancel stopped the job on the slot that ran it (its training process exited) and nothing else:
  that slot went on to train other jobs; the job cancelled while queued never ran.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from app import testing
from app.db import session_scope
from app.settings import Settings
from app.testing import Backend, service_env
from app.workers.models import Worker
from tests.conftest import SERVICE_SETTINGS
from tests.support import Service, make_shapes, tiny_spec

pytestmark = [pytest.mark.backends("postgres"), pytest.mark.slow]

POOL = "exactly-once"
SHORT_JOBS = 12
SLOTS = 4  # 1 + 1 + 2 (--gpus 0,1)
WORKER_ARGS: tuple[tuple[str, ...], ...] = (
    ("--queue", POOL),
    ("--queue", POOL),
    ("--queue", POOL, "--gpus", "0,1"),
)
TRAIN_MODULE = "worker.train_process"


class TrainingWatch:
    """Samples the process table: every training process of the pool's slots, by job and by slot."""

    def __init__(self, roots: list[subprocess.Popen[bytes]]) -> None:
        self.roots = roots
        self.pids_by_job: dict[str, set[int]] = defaultdict(set)
        self.most_per_slot = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrainingWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            # pid -> (parent pid, job id) of every process whose command line is a training's.
            found: dict[int, tuple[int, str]] = {}
            for root in self.roots:
                try:
                    tree = psutil.Process(root.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for proc in tree:
                    try:
                        cmdline = proc.cmdline()
                        if TRAIN_MODULE in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                            found[proc.pid] = (proc.ppid(), cmdline[cmdline.index(TRAIN_MODULE) + 1])
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
                        pass
            per_slot: dict[int, int] = defaultdict(int)
            for pid, (parent, job_id) in found.items():
                # A child the training forks (a subprocess between its fork and its exec) shows the
                # training's command line for a moment: it is not a second training.
                if parent in found:
                    continue
                self.pids_by_job[job_id].add(pid)
                per_slot[parent] += 1
            self.most_per_slot = max([self.most_per_slot, *per_slot.values()])
            self.samples += 1


@pytest.fixture(scope="module")
def workers(backend: Backend, service: Service) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = service_env(backend, service.home.name, **SERVICE_SETTINGS)
    started = [
        testing.start_worker(env, cwd=service.home.parent, log=service.home / f"once-{i}.log", args=args)
        for i, args in enumerate(WORKER_ARGS)
    ]
    yield started
    for proc in started:
        testing.stop_worker(proc)


def _slots(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Worker.name).where(Worker.queue == POOL).order_by(Worker.name)))


def _wait_slots(settings: Settings, count: int, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := _slots(settings)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} slots of pool {POOL!r} did not show up: {found}")
        time.sleep(0.3)
    return found


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _trains(pid: int, job_id: str) -> bool:
    """Whether process `pid` is still a training process of the job."""
    try:
        proc = psutil.Process(pid)
        return job_id in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _running_events(service: Service, job_id: str) -> list[str]:
    return [e["message"] for e in service.events(job_id) if " running on " in e["message"]]


def test_a_dozen_jobs_on_three_workers_run_exactly_once(
    service: Service, service_settings: Settings, workers: list[subprocess.Popen[bytes]]
) -> None:
    make_shapes(service.datasets_dir, "exactly-once", splits=(("train", 4), ("valid", 2)))
    slots = _wait_slots(service_settings, SLOTS)
    assert len(slots) == SLOTS, slots

    def spec(name: str, epochs: int) -> dict[str, Any]:
        training = {"max_epochs": epochs, "batch_size": 2, "average_best_models": False}
        return tiny_spec("exactly-once", name=name, queue=POOL, training=training)

    with TrainingWatch(workers) as watch:
        # The long ones first, so that two slots take them while the short ones queue behind.
        long_ids = [service.submit(spec(f"long-{i}", 200))["id"] for i in range(2)]
        short_ids = [service.submit(spec(f"short-{i}", 1))["id"] for i in range(SHORT_JOBS)]
        never = service.submit(spec("never", 1))["id"]
        assert service.client.post(f"/jobs/{never}/cancel").status_code == 202

        # Both long jobs train (on two different slots, necessarily); cancel them mid-epoch.
        training = [
            service.wait_until(
                job_id, lambda j: j["status"] == "running" and (j["progress"]["batch"] or 0) >= 1, timeout=300
            )
            for job_id in long_ids
        ]
        assert training[0]["worker"] != training[1]["worker"]
        for job_id in long_ids:
            assert service.client.post(f"/jobs/{job_id}/cancel").status_code == 202

        cancelled = [service.wait(job_id, timeout=120) for job_id in long_ids]
        done = [service.wait(job_id, timeout=900) for job_id in short_ids]
        never_job = service.wait(never, timeout=30)
        time.sleep(0.5)  # the last training processes' exits, seen by the sampler

    assert watch.samples > 50
    # No slot ever ran two trainings at once.
    assert watch.most_per_slot == 1, watch.most_per_slot

    # Every short job succeeded once: first attempt, one "running" event, one training process.
    for job in done:
        events = _running_events(service, job["id"])
        assert job["status"] == "succeeded", (job["error"], service.events(job["id"]))
        assert (job["attempt"], job["restarts"]) == (1, 0), job
        assert len(events) == 1 and events[0] == f"attempt 1 running on {job['worker']}", events
        assert len(watch.pids_by_job[job["id"]]) == 1, watch.pids_by_job[job["id"]]
        assert job["worker"] in slots
        points = service.metrics(job["id"])
        keys = [(p["name"], p["epoch"], p["step"]) for p in points]
        assert points and len(keys) == len(set(keys)), "a metric point was written twice"

    # The queue is shared: every slot trained something.
    by_slot: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in [*done, *cancelled]:
        by_slot[job["worker"]].append(job)
    assert set(by_slot) == set(slots), {s: len(j) for s, j in by_slot.items()}

    # One slot, one training at a time: each slot's jobs ran one after the other.
    for slot, jobs in by_slot.items():
        spans = sorted((_time(j["started_at"]), _time(j["finished_at"])) for j in jobs)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"slot {slot} ran two jobs at once: {spans}"

    # Each cancel reached the slot that ran the job, and only that job; the slot went on working.
    for before, job in zip(training, cancelled, strict=True):
        assert job["status"] == "cancelled" and job["error"] is None, job
        assert job["worker"] == before["worker"] and job["attempt"] == 1
        assert not any(_trains(pid, job["id"]) for pid in watch.pids_by_job[job["id"]])
        later = [j for j in by_slot[job["worker"]] if _time(j["started_at"]) > _time(job["finished_at"])]
        assert later, f"slot {job['worker']} trained nothing after its job was cancelled"

    # Cancelled while queued: no worker ever ran it.
    assert never_job["status"] == "cancelled" and never_job["attempt"] == 0, never_job
    assert _running_events(service, never) == [] and never not in watch.pids_by_job


def test_worker_processes_leave_no_training_behind(workers: list[subprocess.Popen[bytes]]) -> None:
    # Runs after the test above. A training process records its job's outcome before it tears torch
    # down (so the job shows as done at once); within seconds every slot is idle again.
    def leftovers() -> list[psutil.Process]:
        found = []
        for root in workers:
            assert root.poll() is None, "a worker died"
            children = psutil.Process(root.pid).children(recursive=True)
            for proc in children:
                try:
                    if TRAIN_MODULE in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc)
                except psutil.NoSuchProcess:
                    pass
        return found

    deadline = time.monotonic() + 60
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
