"""The training process's writer: fenced by the attempt, and never blocked by a row the database refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.db import session_scope, utcnow
from app.jobs.models import Job, JobEvent, Metric
from app.ml.types import LeaseLost, MetricPoint
from app.settings import Settings
from tests.support import Service, insert_job, make_shapes
from worker.reporter import DbReporter


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "reporter", splits=(("train", 2), ("valid", 1)))
    return "reporter"


def _held_job(settings: Settings, dataset: str) -> str:
    """A running job whose attempt 1 holds the lease (no worker runs it: nothing else writes)."""
    now = utcnow()
    return insert_job(
        settings,
        dataset,
        status="running",
        attempt=1,
        started_at=now,
        lease_expires_at=now + timedelta(minutes=1),
    )


def _reporter(settings: Settings, job_id: str) -> DbReporter:
    return DbReporter(
        database_url=settings.database_url,
        job_id=job_id,
        attempt=1,
        lease_seconds=60,
        interval=60,
        watch="mAP@0.50",
    )


def test_names_of_any_length_and_content_are_stored(service_settings: Settings, dataset: str) -> None:
    job_id = _held_job(service_settings, dataset)
    reporter = _reporter(service_settings, job_id)
    long_name = "Valid_AP@0.50_" + "x" * 500
    reporter.metrics(
        [
            MetricPoint("Batch_loss\x00cls", 1.0, epoch=0, step=0),
            MetricPoint(long_name, 0.5, epoch=0),
            MetricPoint("Valid_mAP@0.50", 0.25, epoch=0),
        ]
    )
    reporter.event("class name with a NUL: a\x00b")
    assert reporter.holds_lease()
    with session_scope(service_settings.database_url) as session:
        names = list(session.scalars(select(Metric.name).where(Metric.job_id == job_id).order_by(Metric.id)))
        messages = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
        best = session.scalar(select(Job.best_metric_value).where(Job.id == job_id))
    assert names[0] == "Batch_loss\ufffdcls"
    assert names[1].startswith("Valid_AP@0.50_xxx") and len(names[1]) == Metric.__table__.c.name.type.length
    assert names[2] == "Valid_mAP@0.50" and best == 0.25
    assert "class name with a NUL: a\ufffdb" in messages


def test_a_row_the_database_refuses_is_dropped_with_an_event(
    service_settings: Settings, dataset: str
) -> None:
    job_id = _held_job(service_settings, dataset)
    reporter = _reporter(service_settings, job_id)
    reporter.metrics([MetricPoint("Valid_mAP@0.50", 0.5, epoch=0)])
    reporter.event("fine")
    reporter.event("poison", data={"not json": object()})  # cannot be serialized: refused
    reporter.event("also fine")
    assert reporter.holds_lease()
    with session_scope(service_settings.database_url) as session:
        events = list(
            session.execute(select(JobEvent.message, JobEvent.data).where(JobEvent.job_id == job_id))
        )
        points = list(session.scalars(select(Metric.value).where(Metric.job_id == job_id)))
    messages = [m for m, _ in events]
    assert "fine" in messages and "also fine" in messages and "poison" not in messages
    dropped = [d for m, d in events if m.startswith("dropped 1 row")]
    assert dropped and "poison" in dropped[0]["dropped"][0]
    assert points == [0.5]
    # Later writes are not blocked.
    reporter.event("after")
    reporter.flush()
    with session_scope(service_settings.database_url) as session:
        assert session.scalar(
            select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.message == "after")
        )


def test_an_attempt_that_lost_the_job_writes_nothing(service_settings: Settings, dataset: str) -> None:
    job_id = _held_job(service_settings, dataset)
    reporter = _reporter(service_settings, job_id)
    with session_scope(service_settings.database_url) as session:
        # Another attempt took the job over.
        session.execute(update(Job).where(Job.id == job_id).values(attempt=2))
    reporter.metrics([MetricPoint("Valid_mAP@0.50", 0.5, epoch=0)])
    reporter.progress(epoch=0, max_epochs=1, batch=1, batches_per_epoch=1)
    reporter.event("late")
    assert not reporter.holds_lease()
    assert reporter.lost
    with pytest.raises(LeaseLost):
        reporter.should_stop()
    with session_scope(service_settings.database_url) as session:
        assert not list(session.scalars(select(Metric.id).where(Metric.job_id == job_id)))
        assert session.scalar(select(Job.batch).where(Job.id == job_id)) is None
        messages = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    assert "late" not in messages


def test_one_flush_renews_records_progress_and_best_and_reads_the_cancel(
    service_settings: Settings, dataset: str
) -> None:
    """The single UPDATE of a flush (`lifecycle.report`) does the work of the five it replaced."""
    job_id = _held_job(service_settings, dataset)
    reporter = _reporter(service_settings, job_id)

    def row() -> Job:
        with session_scope(service_settings.database_url) as session:
            return session.get_one(Job, job_id)

    before = row()
    reporter.progress(epoch=0, max_epochs=2, batch=3, batches_per_epoch=4)
    reporter.metrics([MetricPoint("Valid_mAP@0.50", 0.5, epoch=0), MetricPoint("Batch_loss", 2.0, epoch=0)])
    assert reporter.holds_lease() and not reporter.should_stop()
    first = row()
    assert (first.epoch, first.batch, first.batches_per_epoch) == (0, 3, 4)
    assert first.best_metric_value == 0.5
    assert first.training_started_at is not None and first.heartbeat_at is not None
    assert before.lease_expires_at is not None and first.lease_expires_at is not None
    assert first.lease_expires_at > before.lease_expires_at  # 60 s from now, not a minute from the insert

    # The ETA's start stays the first batch's; a worse value leaves the best; a cancel is seen.
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested_at=utcnow()))
    reporter.progress(epoch=1, max_epochs=2, batch=0, batches_per_epoch=4)
    reporter.metrics([MetricPoint("Valid_mAP@0.50", 0.25, epoch=1)])
    assert reporter.holds_lease() and reporter.should_stop()
    second = row()
    assert (second.epoch, second.batch) == (1, 0)
    assert second.training_started_at == first.training_started_at
    assert second.best_metric_value == 0.5
    with session_scope(service_settings.database_url) as session:
        names = list(session.scalars(select(Metric.name).where(Metric.job_id == job_id).order_by(Metric.id)))
    assert names == ["Valid_mAP@0.50", "Batch_loss", "Valid_mAP@0.50"]
