"""Retention of per-batch metric points, on the service's own database (both backends)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs import service as jobs
from app.jobs.models import Job, JobStatus, Metric
from app.jobs.retention import prune_batch_metrics, retention_period
from app.jobs.schemas import JobSpec
from app.ml.types import MetricPoint
from app.settings import Settings
from tests.support import ADMIN, Service, make_unreadable_dataset, tiny_spec

# Per-batch series as the training callback names them, per-epoch ones as SG does, and a name that
# an unescaped LIKE 'Batch_%' would take for a per-batch one ("_" matches any character).
BATCH_SERIES = ("Batch_LR", "Batch_PPYoloELoss/loss_cls")
EPOCH_SERIES = ("Train_PPYoloELoss/loss_cls", "Valid_mAP@0.50", "BatchXLR")
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    return make_unreadable_dataset(service.datasets_dir, "retention-bad")


def _job_with_points(settings: Settings, dataset: str, batches: int, **values: Any) -> str:
    """A job in the state `values` give, with `batches` points of each per-batch series and one point
    of each per-epoch series."""
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(
            session, principal=ADMIN, spec=JobSpec.model_validate(tiny_spec(dataset)), settings=settings
        )
        # Queued jobs are marked as sent far ahead, so no sweeper sends them during the test.
        session.execute(
            update(Job).where(Job.id == job.id).values(enqueued_at=utcnow() + 365 * DAY, **values)
        )
        points = [MetricPoint(name, 0.5, epoch=0, step=i) for name in BATCH_SERIES for i in range(batches)]
        points += [MetricPoint(name, 0.5, epoch=0) for name in EPOCH_SERIES]
        lifecycle.add_metrics(session, job_id=job.id, points=points)
        return job.id


def _names(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        return sorted(session.scalars(select(Metric.name).where(Metric.job_id == job_id)).all())


def test_only_per_batch_points_of_jobs_finished_long_ago_are_deleted(
    service_settings: Settings, dataset: str
) -> None:
    now = utcnow()
    old = [
        _job_with_points(service_settings, dataset, 7, status=status, finished_at=now - 40 * DAY)
        for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
    ]
    recent = _job_with_points(service_settings, dataset, 7, status="succeeded", finished_at=now - DAY)
    # Not finished: kept whatever its dates say.
    queued = _job_with_points(service_settings, dataset, 7, status="queued", created_at=now - 40 * DAY)
    everything = {job_id: _names(service_settings, job_id) for job_id in [*old, recent, queued]}

    with session_scope(service_settings.database_url) as session:
        # Small statements, so the loop runs several times (14 rows per old job).
        deleted = prune_batch_metrics(session, older_than=30 * DAY, batch_rows=5)
    assert deleted >= 3 * 7 * len(BATCH_SERIES)  # other modules' old jobs may have some too

    for job_id in old:
        assert _names(service_settings, job_id) == sorted(EPOCH_SERIES)
    for job_id in (recent, queued):
        assert _names(service_settings, job_id) == everything[job_id]
    # Nothing left to do: a second pass deletes nothing.
    with session_scope(service_settings.database_url) as session:
        assert prune_batch_metrics(session, older_than=30 * DAY) == 0
    # A shorter retention reaches the recent job too.
    with session_scope(service_settings.database_url) as session:
        assert prune_batch_metrics(session, older_than=timedelta(hours=1)) >= 7 * len(BATCH_SERIES)
    assert _names(service_settings, recent) == sorted(EPOCH_SERIES)


def test_max_rows_bounds_one_round(service_settings: Settings, dataset: str) -> None:
    job_id = _job_with_points(
        service_settings, dataset, 10, status="failed", finished_at=utcnow() - 100 * DAY
    )
    rounds = []
    while True:
        with session_scope(service_settings.database_url) as session:
            deleted = prune_batch_metrics(session, older_than=90 * DAY, batch_rows=4, max_rows=8)
        if not deleted:
            break
        rounds.append(deleted)
        assert len(rounds) < 20
    # Whole statements of 4 rows, stopping once 8 are reached; the last round takes the rest.
    assert all(n <= 8 for n in rounds) and sum(rounds) >= 10 * len(BATCH_SERIES)
    assert _names(service_settings, job_id) == sorted(EPOCH_SERIES)


def test_a_rolled_back_prune_deletes_nothing(service_settings: Settings, dataset: str) -> None:
    """The function never commits: the caller decides."""
    job_id = _job_with_points(service_settings, dataset, 3, status="failed", finished_at=utcnow() - 100 * DAY)
    before = _names(service_settings, job_id)
    with pytest.raises(RuntimeError), session_scope(service_settings.database_url) as session:
        assert prune_batch_metrics(session, older_than=90 * DAY) >= 3 * len(BATCH_SERIES)
        raise RuntimeError("roll back")
    assert _names(service_settings, job_id) == before


def test_bad_arguments_are_refused(service_settings: Settings) -> None:
    with session_scope(service_settings.database_url) as session:
        with pytest.raises(ValueError, match="negative"):
            prune_batch_metrics(session, older_than=-DAY)
        with pytest.raises(ValueError, match="batch_rows"):
            prune_batch_metrics(session, older_than=DAY, batch_rows=0)


def test_the_retention_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGJOBS_BATCH_METRICS_RETENTION_DAYS", raising=False)
    assert retention_period(Settings()) == timedelta(days=30)
    for value, expected in (
        ("7", timedelta(days=7)),
        ("0.5", timedelta(hours=12)),
        ("", None),
        ("none", None),
    ):
        monkeypatch.setenv("SGJOBS_BATCH_METRICS_RETENTION_DAYS", value)
        assert retention_period(Settings()) == expected, value
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("SGJOBS_BATCH_METRICS_RETENTION_DAYS", bad)
        with pytest.raises(ValueError):
            Settings()
