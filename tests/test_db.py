"""`app.db` on a real PostgreSQL: a transaction that holds locks may not sit idle for ever.

A process frozen between its write and its commit (SIGSTOP here; a paused VM or a debugger in
life) keeps its row locks. Before `bound_locked_idle`, every sweeper waited on the frozen worker's
job row until it woke, so no lease expired anywhere meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.db import bound_locked_idle, connection_lost, session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.models import Job, JobStatus
from app.migrate import upgrade
from app.settings import Settings
from app.testing import backend_resources
from tests.support import insert_job, make_shapes

# Short, so the test waits seconds; long enough that the parent's first sweep comes well before it.
BOUND_SECONDS = 5.0

# The child: renews its job's lease (a row lock), then freezes itself before the commit. Once woken
# it says whether the commit still went through.
FROZEN_WRITER = """
import os, signal, sys
from sqlalchemy.exc import DBAPIError
from app.db import session_scope
from app.jobs import lifecycle
try:
    with session_scope(os.environ["SGJOBS_DATABASE_URL"]) as session:
        assert lifecycle.renew(session, job_id=sys.argv[1], attempt=1, lease_seconds=3600)
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    print("committed", flush=True)
except DBAPIError as exc:
    print("refused:", exc.connection_invalidated, str(exc.orig).splitlines()[0], flush=True)
"""


@pytest.fixture(scope="module")
def pg_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with backend_resources("postgres", prefix="sgjobs-test-db") as backend:
        assert backend.database_url is not None
        home = tmp_path_factory.mktemp("db-home")
        settings = Settings(home=home, database_url=backend.database_url)
        upgrade(settings.database_url)
        make_shapes(settings.datasets_dir, "frozen", splits=(("train", 2), ("valid", 1)))
        yield settings


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_frozen_writer_neither_stalls_the_sweeper_nor_keeps_its_locks(pg_settings: Settings) -> None:
    job_id = insert_job(
        pg_settings, "frozen", status="running", lease_expires_at=utcnow() - timedelta(minutes=1)
    )
    env = {
        **os.environ,
        "SGJOBS_DATABASE_URL": pg_settings.database_url,
        "SGJOBS_DB_LOCK_IDLE_SECONDS": str(BOUND_SECONDS),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", FROZEN_WRITER, job_id], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        deadline = time.monotonic() + 30
        while not _stopped(child.pid):
            assert time.monotonic() < deadline, "the child never stopped itself"
            time.sleep(0.05)
        frozen_at = time.monotonic()

        # The expired job's row is locked: skipped, not waited for (and not expired behind the lock).
        with session_scope(pg_settings.database_url) as session:
            assert lifecycle.expire_leases(session) == {}
        assert time.monotonic() - frozen_at < BOUND_SECONDS, "the sweep waited on the frozen row"

        # Once the bound has passed, the server has ended the frozen session: a later sweep expires it.
        moved: dict[str, JobStatus] = {}
        while not moved:
            assert time.monotonic() - frozen_at < BOUND_SECONDS + 30, "the frozen row stayed locked"
            time.sleep(0.5)
            with session_scope(pg_settings.database_url) as session:
                moved = lifecycle.expire_leases(session)
        assert moved == {job_id: JobStatus.queued}
        assert time.monotonic() - frozen_at >= BOUND_SECONDS - 0.5
        assert _stopped(child.pid), "the child was woken: the test proves nothing"
    finally:
        child.send_signal(signal.SIGCONT)
    out, _ = child.communicate(timeout=60)
    # Its renewal never landed: its commit after waking is refused (as a lost connection), not
    # applied late.
    assert out.startswith("refused: True") and "idle-in-transaction" in out, out
    with session_scope(pg_settings.database_url) as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.queued and job.lease_expires_at is None


def test_only_transactions_that_take_locks_are_bounded(pg_settings: Settings) -> None:
    job_id = insert_job(pg_settings, "frozen")
    # One pooled connection: every transaction below runs on it (until the server ends it).
    engine = create_engine(pg_settings.database_url, pool_pre_ping=True, pool_size=1, max_overflow=0)
    bound_locked_idle(engine, 1.0)
    try:
        # A read-only transaction may idle (an upload's quota check, then minutes of extraction).
        with Session(engine) as session:
            assert session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.queued
            time.sleep(2.5)
            assert session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.queued
            session.commit()
        # One that wrote may not: its session is ended and nothing it wrote lands. Also the second
        # writing transaction on one pooled connection (the bound is set again in each).
        with Session(engine) as session:
            session.execute(update(Job).where(Job.id == job_id).values(name="written-and-committed"))
            session.commit()
        with Session(engine) as session:
            session.execute(update(Job).where(Job.id == job_id).values(name="written-then-idle"))
            time.sleep(2.5)
            with pytest.raises(DBAPIError, match="idle-in-transaction") as ended:
                session.commit()
            # What the reporter and the API's error handler treat as "retry on a new connection".
            assert connection_lost(ended.value)
        # The bound is the transaction's own: the pooled connection's next transaction is unbounded.
        with Session(engine) as session:
            assert session.scalar(select(Job.name).where(Job.id == job_id)) == "written-and-committed"
            assert session.scalar(text("SHOW idle_in_transaction_session_timeout")) == "0"
    finally:
        engine.dispose()
