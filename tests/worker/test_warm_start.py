"""Warm job start: a worker's fork server (`worker.standby`, `worker.forkserver`), started ahead of
its jobs. It has imported super-gradients once; each claimed attempt goes to a child it forked ahead
of the claim, which moves its output and super-gradients' logs into the job directory and exits with
the attempt, so that the next job runs in another process that nothing of this one's training reached.
"""

from __future__ import annotations

import json
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
from app.ml.sg_setup import training_environment
from app.settings import Settings
from app.testing import Backend
from tests.conftest import started_service
from tests.support import Service, make_shapes, tiny_spec
from worker.runner import LEASE_LOST_GRACE_SECONDS
from worker.standby import READY_FILE, STANDBY_ARG, STANDBY_DIR, STANDBY_OUTPUT, StandbySlot

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


@pytest.fixture(scope="module")
def service(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """This module's own service, with the shipped default of a spare training process per worker."""
    # Torch's default number of threads (tests/conftest.py sets one for the suite): the fork server
    # imports with one and gives its children the default back, each a thread pool of its own.
    threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    with started_service(
        backend, tmp_path_factory.mktemp(f"spare-{backend.name}"), extra_env=threads, training_spare=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "warm", splits=(("train", 4), ("valid", 2)))
    return "warm"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _fork_servers() -> list[psutil.Process]:
    """Fork servers: processes with `STANDBY_ARG` in their command line whose parent has none (their
    waiting child has it too, until it takes an attempt)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if STANDBY_ARG in (proc.info["cmdline"] or []) and STANDBY_ARG not in proc.parent().cmdline():
                found.append(proc)
        except (psutil.Error, AttributeError):
            pass
    return found


def _ready_server(service: Service, timeout: float = 300) -> psutil.Process:
    """The service's fork server, once a child of it waits ready for a job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = list((service.home / STANDBY_DIR).glob(f"*/{READY_FILE}"))
        for proc in _fork_servers():
            try:
                if Path(proc.cwd()) in {r.parent for r in ready}:
                    return proc
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError("no fork server became ready")


def _warm_event(service: Service, job_id: str) -> dict[str, Any] | None:
    events = [e for e in service.events(job_id) if (e.get("data") or {}).get("standby")]
    assert len(events) <= 1, events
    return events[0] if events else None


def _claimed_at(service: Service, job_id: str) -> datetime:
    return next(_time(e["time"]) for e in service.events(job_id) if "attempt 1 running on" in e["message"])


def test_jobs_one_after_the_other_run_in_children_forked_before_their_claim(
    service: Service, dataset: str
) -> None:
    jobs = []
    for name in ("warm-a", "warm-b"):
        server = _ready_server(service)
        waiting = [c.pid for c in server.children()]
        job = service.submit(tiny_spec(dataset, name=name))
        done = service.wait(job["id"], timeout=300)
        assert done["status"] == "succeeded", (done, service.events(job["id"]))
        jobs.append((server, waiting, done))
    (server_a, waiting_a, a), (server_b, waiting_b, b) = jobs
    warm_a, warm_b = _warm_event(service, a["id"]), _warm_event(service, b["id"])
    assert warm_a is not None and warm_b is not None
    # One fork server, which imported once; each job ran in the child that waited before its claim,
    # a process of its own (not the fork server) that has exited.
    assert server_a.pid == server_b.pid
    assert warm_a["data"]["fork_server"] == warm_b["data"]["fork_server"] == server_a.pid
    assert [warm_a["data"]["pid"]] == waiting_a and [warm_b["data"]["pid"]] == waiting_b
    assert len({server_a.pid, warm_a["data"]["pid"], warm_b["data"]["pid"]}) == 3
    assert _time(warm_b["data"]["process_started"]) < _claimed_at(service, a["id"])
    assert "forked by fork server" in warm_b["message"]
    for job, child in ((a, warm_a["data"]["pid"]), (b, warm_b["data"]["pid"])):
        # A child exits by itself once its outcome is recorded, with 0, long before the worker would
        # stop it (LEASE_LOST_GRACE_SECONDS): not stuck in a library's exit code that waits for a
        # thread which exists only in the fork server. The fork server reaps it.
        exited = f"job {job['id']}: training process {child} of attempt 1 exited with "
        deadline = time.monotonic() + LEASE_LOST_GRACE_SECONDS / 2
        while exited not in service.log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"{exited}0\n" in service.log_file.read_text(), service.log_file.read_text()[-3000:]
        assert not psutil.pid_exists(child)
    # Each job's logs are its own: its output, and super-gradients' console sink and log file, moved
    # from the fork server's folder into the job directory.
    for job, other in ((a, b), (b, a)):
        job_dir = Path(job["job_dir"])
        sg_console = (files.sg_log_dir(job_dir) / "console.log").read_text()
        assert f"{job['id']} 1" in sg_console and other["id"] not in sg_console, sg_console[:500]
        assert list(files.sg_log_dir(job_dir).glob("logs_*.log"))
        output = files.console_log(job_dir).read_text()
        assert other["id"] not in output
    # The next child waits already, forked by the same fork server; one folder, the fork server's.
    assert _ready_server(service).pid == server_a.pid
    assert len(list((service.home / STANDBY_DIR).iterdir())) == 1


def test_a_training_child_killed_is_reported_as_killed(service: Service, dataset: str) -> None:
    server = _ready_server(service)
    spec = {**tiny_spec(dataset, name="warm-killed", training={"max_epochs": 30}), "max_restarts": 0}
    job = service.submit(spec)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trainers = [
            c for c in server.children() if job["id"] in c.cmdline() and "worker.train_process" in c.cmdline()
        ]
        if trainers and service.job(job["id"])["status"] == "running":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job {job['id']} did not start in a child of fork server {server.pid}")
    os.kill(trainers[0].pid, signal.SIGKILL)
    done = service.wait(job["id"], timeout=300)
    # SIGKILL without a result: what the kernel's out-of-memory killer does (`killed_by_oom_killer`),
    # which the worker learns from the fork server that reaped the child.
    assert done["status"] == "failed" and done["error"]["reason"] == "out_of_memory", done
    assert "killed by SIGKILL" in done["error"]["message"], done
    assert _ready_server(service).pid == server.pid


def test_a_dead_fork_server_is_replaced_at_the_next_claim(service: Service, dataset: str) -> None:
    server = _ready_server(service)
    os.kill(server.pid, signal.SIGKILL)
    # A zombie until the worker reaps it (at its next claim).
    deadline = time.monotonic() + 10
    while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    job = service.submit(tiny_spec(dataset, name="warm-dead"))
    done = service.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, service.events(job["id"]))
    warm = _warm_event(service, job["id"])
    assert warm is not None and warm["data"]["fork_server"] not in (None, server.pid)
    assert _ready_server(service).pid == warm["data"]["fork_server"]


def test_a_fork_server_started_with_another_environment_is_discarded(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", device="cpu")
    slot = StandbySlot()
    slot.fill(settings)
    spare = slot.spare
    assert spare is not None and spare.proc.poll() is None
    try:
        # What a training process for the attempt would get now: a setting changed since.
        changed = settings.model_copy(update={"jobs_dir": tmp_path / "elsewhere"})
        env = training_environment(changed, tmp_path / "job" / "logs")
        forked = slot.take(changed, env, job_id="j", attempt=1)
        assert spare.proc.poll() is not None and not spare.directory.exists()
        # The attempt went to a new fork server, started with the attempt's environment.
        assert forked is not None and slot.spare is forked.server and forked.server.proc.pid != spare.proc.pid
        # With neither a fork server nor a spare, there is none to take an attempt.
        plain = changed.model_copy(update={"training_spare": False, "training_fork_server": False})
        slot.close()
        assert slot.take(plain, training_environment(plain, tmp_path / "l"), job_id="j", attempt=1) is None
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


def test_without_forking_the_fork_server_is_a_spare_that_trains_one_attempt_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No database behind these settings: the attempt fails at once (its job cannot be read), which is
    # all this needs: the protocol of a spare, not a training. (The fork server reads its settings
    # from the environment it inherits, as a worker's does.)
    monkeypatch.setenv("SGJOBS_TRAINING_FORK_SERVER", "false")
    settings = Settings(home=tmp_path / "home", device="cpu")
    assert not settings.training_fork_server
    slot = StandbySlot()
    slot.fill(settings)
    spare = slot.spare
    assert spare is not None
    try:
        deadline = time.monotonic() + 300
        while not (spare.directory / READY_FILE).exists():
            assert spare.proc.poll() is None and time.monotonic() < deadline, spare.proc.returncode
            time.sleep(0.2)
        assert psutil.Process(spare.proc.pid).children() == []  # it forked nothing
        env = training_environment(settings, tmp_path / "job" / "logs")
        trained = slot.take(settings, env, job_id="no-such-job", attempt=1)
        assert trained is not None
        assert trained.wait(timeout=120) == 0
        assert trained.itself and trained.pid == spare.proc.pid and spare.used_up
        # It ran the attempt as a process started for it would: a result file in the job directory.
        job_dir = settings.jobs_dir / "no-such-job"
        assert json.loads(files.result_file(job_dir).read_text())["status"] == "failed"
        assert "Traceback" in files.console_log(job_dir).read_text()
        # Used up: the slot starts another.
        slot.fill(settings)
        assert slot.spare is not None and slot.spare is not spare and not spare.directory.exists()
    finally:
        slot.close()
        spare.discard()
