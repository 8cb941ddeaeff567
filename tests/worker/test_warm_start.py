"""Warm job start: a worker's spare training process, started ahead of its job (`worker.standby`).

The spare has imported super-gradients when a job is claimed; it takes the attempt, moves its
output and super-gradients' logs into the job directory, and exits with the attempt, so that the
next job runs in another process that nothing of this one's training reached.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.jobs import files
from app.ml.sg_setup import child_environment
from app.settings import Settings
from app.testing import Backend
from tests.conftest import started_service
from tests.support import Service, make_shapes, tiny_spec
from worker.standby import READY_FILE, STANDBY_ARG, STANDBY_DIR, STANDBY_OUTPUT, StandbySlot

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


@pytest.fixture(scope="module")
def service(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """This module's own service, with the shipped default of a spare training process per worker."""
    with started_service(
        backend, tmp_path_factory.mktemp(f"spare-{backend.name}"), training_spare=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "warm", splits=(("train", 4), ("valid", 2)))
    return "warm"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _spares() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if STANDBY_ARG in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _ready_spare(service: Service, timeout: float = 300) -> psutil.Process:
    """The service's spare training process, once it has imported everything and waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = list((service.home / STANDBY_DIR).glob(f"*/{READY_FILE}"))
        for proc in _spares():
            try:
                if Path(proc.cwd()) in {r.parent for r in ready}:
                    return proc
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError("no spare training process became ready")


def _warm_event(service: Service, job_id: str) -> dict[str, Any] | None:
    events = [e for e in service.events(job_id) if (e.get("data") or {}).get("standby")]
    assert len(events) <= 1, events
    return events[0] if events else None


def _claimed_at(service: Service, job_id: str) -> datetime:
    return next(_time(e["time"]) for e in service.events(job_id) if "attempt 1 running on" in e["message"])


def test_jobs_one_after_the_other_run_in_spares_started_before_their_claim(
    service: Service, dataset: str
) -> None:
    jobs = []
    for name in ("warm-a", "warm-b"):
        spare = _ready_spare(service)
        job = service.submit(tiny_spec(dataset, name=name))
        done = service.wait(job["id"], timeout=300)
        assert done["status"] == "succeeded", (done, service.events(job["id"]))
        jobs.append((spare, done))
    (spare_a, a), (spare_b, b) = jobs
    warm_a, warm_b = _warm_event(service, a["id"]), _warm_event(service, b["id"])
    assert warm_a is not None and warm_b is not None
    # Each ran in the spare that waited before its claim, a process of its own that has exited.
    assert warm_a["data"]["pid"] == spare_a.pid and warm_b["data"]["pid"] == spare_b.pid
    assert spare_a.pid != spare_b.pid
    assert _time(warm_b["data"]["process_started"]) < _claimed_at(service, b["id"])
    # (A training records its outcome before it tears torch down.)
    spare_a.wait(timeout=60)
    spare_b.wait(timeout=60)
    # Each job's logs are its own: its output, and super-gradients' console sink and log file, moved
    # from the spare's folder (removed) into the job directory.
    for job, other in ((a, b), (b, a)):
        job_dir = Path(job["job_dir"])
        sg_console = (files.sg_log_dir(job_dir) / "console.log").read_text()
        assert f"{job['id']} 1" in sg_console and other["id"] not in sg_console, sg_console[:500]
        assert list(files.sg_log_dir(job_dir).glob("logs_*.log"))
        output = files.console_log(job_dir).read_text()
        assert other["id"] not in output
    # The next spare waits already; the folders of the spares that took a job are gone.
    assert _ready_spare(service).pid not in (spare_a.pid, spare_b.pid)
    assert len(list((service.home / STANDBY_DIR).iterdir())) == 1


def test_a_dead_spare_is_replaced_by_a_fresh_training_process(service: Service, dataset: str) -> None:
    spare = _ready_spare(service)
    os.kill(spare.pid, signal.SIGKILL)
    # A zombie until the worker reaps it (at its next claim).
    deadline = time.monotonic() + 10
    while spare.is_running() and spare.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    job = service.submit(tiny_spec(dataset, name="warm-dead"))
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, service.events(job["id"]))
    assert _warm_event(service, job["id"]) is None
    assert _ready_spare(service).pid != spare.pid


def test_a_spare_started_with_another_environment_is_discarded(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu")
    slot = StandbySlot()
    slot.fill(settings)
    spare = slot.spare
    assert spare is not None and spare.proc.poll() is None
    try:
        # What a training process for the attempt would get now: a setting changed since.
        changed = settings.model_copy(update={"jobs_dir": tmp_path / "elsewhere"})
        env = child_environment(tmp_path / "job" / "logs", extra=changed.as_env())
        assert slot.take(env, job_id="j", attempt=1) is None
        assert spare.proc.poll() is not None and not spare.directory.exists()
        assert slot.spare is None
    finally:
        slot.close()
        spare.discard()


def test_folders_of_spares_whose_worker_is_gone_are_removed(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = settings.home / STANDBY_DIR / f"{socket.gethostname()}@{gone.pid}-x"
    elsewhere = settings.home / STANDBY_DIR / f"another-host@{gone.pid}-x"
    for folder in (orphan, elsewhere):
        (folder / STANDBY_OUTPUT).parent.mkdir(parents=True)
        (folder / READY_FILE).write_text("1\n")
    slot = StandbySlot()
    try:
        slot.fill(settings)
        assert slot.spare is not None and slot.spare.directory.is_dir()
        assert not orphan.exists() and elsewhere.exists()
    finally:
        slot.close()
