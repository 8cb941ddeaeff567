"""Session fixtures: a throwaway database and broker per backend, and a real `sgjobs serve`.

Tests that use `service` run once per backend: SQLite with the embedded SQLite broker, and
PostgreSQL with Redis (both must be running on 127.0.0.1, as on the CI machine). A test marked
`@pytest.mark.backends("sqlite")` runs on the listed backends only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs.models import Job, JobStatus
from app.settings import Settings
from app.testing import BACKENDS, Backend, S3Server, backend_resources, s3_server, serve
from tests.support import Service
from tests.weights.standins import build_standins

PG_ADMIN_URL = os.environ.get("SGJOBS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# Under pytest-xdist the 2 CPUs are busy the whole run, and two trainings often run at once. OpenMP's
# idle threads spin by default: two 2-thread trainings took 3.3x as long as one alone (a conv stack),
# and 6x (34 s each against 5.5 s) for 15 steps of YOLO-NAS-S on 64 px batches of 8 (2026-11-28, Xeon
# Ice Lake). Passive waiting gave 7.2 s each, but 8.5 s for one alone (twice the default's 4.4 s);
# one thread each gave 5.5-6.1 s together and 5.7 s alone, and the least CPU time in every case
# (5.4-5.9 s against 6.9-9.8 passive). So the suite's processes use one intra-op thread each (every
# service it starts inherits this environment); tests/worker/test_warm_start.py runs its service
# with torch's default, so that the fork server's children get a thread pool of their own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REDIS_URL = os.environ.get("SGJOBS_TEST_REDIS", "redis://127.0.0.1:6379/0")
ALL_BACKENDS = BACKENDS
# Short heartbeats and report intervals so tests see progress quickly; a long cancel grace so a
# slow CI machine never turns a cancel into a kill.
SERVICE_SETTINGS: dict[str, object] = {
    "device": "cpu",
    "heartbeat_seconds": 1,
    "report_interval_seconds": 0.2,
    "cancel_grace_seconds": 60,
    "sweep_interval_seconds": 1,
    "resend_after_seconds": 5,
    "lease_seconds": 30,
    # Webhooks to the tests' own receivers (tests/webhooks), retried quickly and not too often.
    "webhook_allowed_hosts": ["127.0.0.1"],
    "webhook_poll_seconds": 0.2,
    "webhook_backoff_seconds": 0.2,
    "webhook_max_attempts": 4,
    "webhook_timeout_seconds": 5,
    # Keep-alive comments every second, so tests/jobs/test_stream.py sees one on a quiet stream.
    "stream_ping_seconds": 1,
    # No onnxruntime export of each succeeded job (seconds of CPU per job, for every training of the
    # suite): PyTorch serves these services' models. tests/prediction/test_warm.py runs a service with
    # the default (on), and tests/ml/test_ort_serving.py checks what onnxruntime answers.
    "serving_export": False,
    # Nor the API's warmer (it would load every succeeded job's model, on PyTorch here), nor a fork
    # server started with every worker (seconds of imports at every worker start, used or not): a
    # worker starts its fork server at its first claim, and its later jobs are forked from it.
    # tests/prediction/test_warm.py and tests/worker/test_warm_start.py run services with them on.
    "predict_warm": False,
    "training_spare": False,
    # Tenants with small quotas, for tests/auth/test_quotas.py; team-weights' storage holds one
    # YOLO-NAS-S checkpoint (about 77 MB) but not two.
    "tenant_quotas": {
        "team-quota": {"active_jobs": 1, "storage_bytes": 10_000, "epoch_pixels": 2 * 64 * 64},
        "team-weights": {"storage_bytes": 100_000_000},
    },
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run only on these backends")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker else ALL_BACKENDS
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`--dist loadgroup`), a module's tests of one backend run on one worker, so
    its module fixtures (mostly trained jobs) are built once, as in a single process. A module with
    `XDIST_SPREAD = True` (cheap fixtures, long tests) is spread test by test; an explicit
    `xdist_group` mark wins."""
    for item in items:
        module = getattr(item, "module", None)
        if item.get_closest_marker("xdist_group") is not None or getattr(module, "XDIST_SPREAD", False):
            continue
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend", "") if callspec is not None else ""
        name = module.__name__ if module is not None else item.nodeid.split("::")[0]
        # No "]" in a group's name: xdist reads `ID@GROUP` as a group only after the id's last "]".
        item.add_marker(pytest.mark.xdist_group(f"{name}:{backend}" if backend else name))
    if config.getoption("loadgroup", False):
        for item in items:
            _suffix_group(item)


def _suffix_group(item: pytest.Item) -> None:
    """Put the item's group in its node id (`ID@GROUP`), which is all the xdist controller schedules by.

    pytest-xdist 3.8 does it by setting `item._nodeid`, which pytest 9.2 no longer reads: the node id
    is `str(item._id)`. Without this every test was scheduled on its own, so a module's tests were
    spread over both workers and interleaved with other modules', and its module fixtures (trained
    jobs) were built again each time (tests/ml/test_resume.py's 45 s training twice per run). Fails
    the collection if the id did not take, or would not read as a group, rather than silently
    scheduling test by test again.
    """
    groups = sorted(
        {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
    )
    if not groups or item.nodeid.rfind("@") > item.nodeid.rfind("]"):  # xdist's own test for a group
        return
    wanted = f"{item.nodeid}@{'_'.join(groups)}"
    node_id = dataclasses.replace(item._id)  # same path, names and parameters; only the text differs
    object.__setattr__(node_id, "_str_cache", wanted)
    item._id = node_id
    if item.nodeid != wanted or not wanted.rfind("@") > wanted.rfind("]"):
        raise pytest.UsageError(f"could not put the xdist group into the node id of {item.nodeid}")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """SQLite: the embedded defaults in SGJOBS_HOME. PostgreSQL + Redis: a throwaway database and queue."""
    with backend_resources(
        request.param, prefix="sgjobs-test", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    ) as resources:
        yield resources


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
    with started_service(backend, tmp_path_factory.mktemp(f"sgjobs-{backend.name}")) as running:
        yield running


@contextmanager
def started_service(
    backend: Backend, home: Path, extra_env: dict[str, str] | None = None, **settings: object
) -> Iterator[Service]:
    """`sgjobs serve` with SERVICE_SETTINGS (and `settings` over them) in `home`, as a Service;
    `extra_env` over this process's environment."""
    # SGJOBS_HOME relative, as in the README's default (`./var`): every process must resolve it the same.
    with serve(
        backend, home.name, cwd=home.parent, settings={**SERVICE_SETTINGS, **settings}, extra_env=extra_env
    ) as running:
        with httpx.Client(base_url=running.base_url, headers=running.headers, timeout=30) as client:
            yield Service(
                backend.name,
                running.base_url,
                running.home,
                running.home / "datasets",
                running.log_file,
                client,
                running.admin_key,
            )


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint files built from real super-gradients models, good and bad (`tests.weights.standins`)."""
    return build_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server per test process; each module keeps to a key prefix of its own."""
    with s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def stop_later(service_settings: Settings) -> Iterator[list[str]]:
    """Jobs a test leaves queued or running: failed afterwards, so no worker ever trains them."""
    ids: list[str] = []
    yield ids
    with session_scope(service_settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status.in_((JobStatus.queued, JobStatus.running)))
            .values(status=JobStatus.failed, finished_at=utcnow(), error_reason="internal")
        )
