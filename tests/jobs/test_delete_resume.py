"""DELETE /jobs/{id} and POST /jobs/{id}/resume, through real HTTP against `sgjobs serve` (both backends).

Jobs in a given state are inserted directly. Every job here reads a dataset whose annotations are
broken: a job the service's worker picks up (a resumed one, or one the sweeper sends) fails at once
with dataset_error instead of spending a training. Queued jobs are marked as sent far in the future,
so no sweeper sends them while a test looks at them.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.auth.principal import DEFAULT_TENANT
from app.db import get_sessionmaker, session_scope, utcnow
from app.errors import Conflict
from app.jobs import lifecycle
from app.jobs import service as jobs
from app.jobs.files import CHECKPOINTS, CKPT_BEST, CKPT_LATEST, CONSOLE_LOG
from app.jobs.models import Job, JobEvent, JobStatus, Metric
from app.jobs.schemas import JobSpec
from app.ml.types import CHECKPOINTS_DIR, MetricPoint
from app.settings import Settings
from app.weights.models import Weights, WeightsSource
from app.weights.service import weights_file
from tests.support import ADMIN, Service, insert_job, make_unreadable_dataset, tiny_spec

NEVER = timedelta(days=365)


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    return make_unreadable_dataset(service.datasets_dir, "delete-resume-bad")


def _insert_job(
    settings: Settings, dataset: str, *, spec: dict[str, Any] | None = None, **values: Any
) -> str:
    """`insert_job`, and a queued one is never sent by a sweeper."""
    if values.get("status", JobStatus.queued) == JobStatus.queued:
        values.setdefault("enqueued_at", utcnow() + NEVER)
    return insert_job(settings, dataset, spec=spec, **values)


def _finished(settings: Settings, dataset: str, status: str = "failed", **values: Any) -> str:
    """A finished job with a directory of its own (as a worker leaves it)."""
    job_id = _insert_job(settings, dataset, status=status, finished_at=utcnow(), **values)
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True)
    (job_dir / CONSOLE_LOG).write_text("training output\n")
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(job_dir=str(job_dir)))
    return job_id


def _write_checkpoint(settings: Settings, job_id: str, kind: str = CKPT_LATEST) -> Path:
    """A stand-in checkpoint file where super-gradients writes one (not loadable: never trained on)."""
    path = settings.jobs_dir / job_id / CHECKPOINTS_DIR / "train" / "RUN_1" / CHECKPOINTS[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a real checkpoint")
    return path


def _row(settings: Settings, job_id: str) -> Job | None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is not None:
            session.expunge(job)
        return job


def _counts(settings: Settings, job_id: str) -> tuple[int, int, int]:
    """(jobs, events, metric points) rows of a job."""
    with session_scope(settings.database_url) as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model).where(column == job_id)) or 0
            for model, column in ((Job, Job.id), (JobEvent, JobEvent.job_id), (Metric, Metric.job_id))
        )


# --------------------------------------------------------------------------------------------------
# DELETE /jobs/{job_id}


def test_deleting_a_finished_job_removes_its_rows_and_directory(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = _finished(service_settings, dataset, status="failed", error_reason="internal")
    checkpoint = _write_checkpoint(service_settings, job_id, CKPT_BEST)
    with session_scope(service_settings.database_url) as session:
        lifecycle.add_metrics(
            session,
            job_id=job_id,
            points=[
                MetricPoint("Batch_LR", 0.1, epoch=0, step=0),
                MetricPoint("Valid_mAP@0.50", 0.5, epoch=0),
            ],
        )
        lifecycle.add_event(session, job_id=job_id, message="a log line")
        # Weights promoted from the job: a row and a file of their own.
        weights = Weights(
            tenant=DEFAULT_TENANT,
            name="promoted",
            model="yolo_nas_s",
            num_classes=3,
            size_bytes=5,
            sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
            source=WeightsSource.job,
            job_id=job_id,
        )
        session.add(weights)
        session.flush()
        weights_id = weights.id
    promoted = weights_file(service_settings, weights_id)
    promoted.parent.mkdir(parents=True, exist_ok=True)
    promoted.write_bytes(b"saved")
    job_dir = service_settings.jobs_dir / job_id
    assert _counts(service_settings, job_id) == (1, 2, 2) and checkpoint.is_file()

    response = service.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 204, response.text
    assert response.content == b""

    assert _counts(service_settings, job_id) == (0, 0, 0)
    assert not job_dir.exists()
    assert service.client.get(f"/jobs/{job_id}").status_code == 404
    assert service.client.delete(f"/jobs/{job_id}").status_code == 404
    # The promoted weights stay, file and all.
    assert service.client.get(f"/weights/{weights_id}").status_code == 200
    assert promoted.read_bytes() == b"saved"
    assert service.client.delete(f"/weights/{weights_id}").status_code == 204


@pytest.mark.parametrize("status", ["succeeded", "cancelled"])
def test_every_finished_status_can_be_deleted(
    service: Service, service_settings: Settings, dataset: str, status: str
) -> None:
    job_id = _finished(service_settings, dataset, status=status)
    assert service.client.delete(f"/jobs/{job_id}").status_code == 204
    assert _row(service_settings, job_id) is None
    assert not (service_settings.jobs_dir / job_id).exists()


def test_a_job_that_never_ran_is_deleted_without_a_directory(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job = service.submit(tiny_spec(dataset, name="never-ran"))
    service.client.post(f"/jobs/{job['id']}/cancel")
    service.wait(job["id"], timeout=120)
    assert service.client.delete(f"/jobs/{job['id']}").status_code == 204
    assert _row(service_settings, job["id"]) is None


def test_a_directory_outside_the_jobs_folder_is_left_alone(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the service's")
    job_id = _insert_job(
        service_settings, dataset, status="failed", finished_at=utcnow(), job_dir=str(elsewhere)
    )
    assert service.client.delete(f"/jobs/{job_id}").status_code == 204
    assert _row(service_settings, job_id) is None
    assert (elsewhere / "keep.txt").read_text() == "not the service's"


def test_the_jobs_folder_itself_is_never_removed(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = _insert_job(
        service_settings,
        dataset,
        status="failed",
        finished_at=utcnow(),
        job_dir=str(service_settings.jobs_dir),
    )
    assert service.client.delete(f"/jobs/{job_id}").status_code == 204
    assert service_settings.jobs_dir.is_dir()


@pytest.mark.parametrize("status", ["queued", "running"])
def test_deleting_a_queued_or_running_job_is_409(
    service: Service, service_settings: Settings, dataset: str, status: str, stop_later: list[str]
) -> None:
    job_id = _insert_job(service_settings, dataset, status=status, started_at=utcnow(), heartbeat_at=utcnow())
    stop_later.append(job_id)
    response = service.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409, response.text
    problem = response.json()
    assert problem["code"] == "conflict" and response.headers["content-type"] == "application/problem+json"
    assert "cancel it first" in problem["detail"] and status in problem["detail"]
    assert _row(service_settings, job_id) is not None


def test_deleting_a_job_another_job_starts_from_is_409_naming_it(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    source = _finished(service_settings, dataset, status="succeeded")
    _write_checkpoint(service_settings, source, CKPT_BEST)
    user = _insert_job(
        service_settings, dataset, spec=tiny_spec(dataset, init_from={"job_id": source}), status="queued"
    )
    response = service.client.delete(f"/jobs/{source}")
    assert response.status_code == 409, response.text
    problem = response.json()
    assert problem["job_ids"] == [user]
    assert user in problem["detail"]
    assert (service_settings.jobs_dir / source).is_dir()

    # Once that job is cancelled, nothing stands in the way.
    assert service.client.post(f"/jobs/{user}/cancel").json()["status"] == "cancelled"
    assert service.client.delete(f"/jobs/{source}").status_code == 204
    assert not (service_settings.jobs_dir / source).exists()


def test_a_delete_that_loses_a_race_with_a_resume_is_409(
    service: Service, service_settings: Settings, dataset: str, stop_later: list[str]
) -> None:
    job_id = _finished(service_settings, dataset, status="cancelled")
    stop_later.append(job_id)
    session = get_sessionmaker(service_settings.database_url)()
    try:
        loaded = session.get(Job, job_id)  # read as cancelled (held: the identity map is weak)
        assert loaded is not None
        with session_scope(service_settings.database_url) as other:
            other.execute(
                update(Job).where(Job.id == job_id).values(status="queued", enqueued_at=utcnow() + NEVER)
            )
        with pytest.raises(Conflict, match="changed meanwhile"):
            jobs.delete_job(session, settings=service_settings, job_id=job_id, scope=None)
    finally:
        session.rollback()
        session.close()
    assert _row(service_settings, job_id) is not None
    assert (service_settings.jobs_dir / job_id).is_dir()


# --------------------------------------------------------------------------------------------------
# POST /jobs/{job_id}/resume


@pytest.mark.parametrize(
    ("status", "phrase"),
    [("queued", "not finished"), ("running", "not finished"), ("succeeded", "already succeeded")],
)
def test_resuming_a_queued_running_or_succeeded_job_is_409(
    service: Service,
    service_settings: Settings,
    dataset: str,
    status: str,
    phrase: str,
    stop_later: list[str],
) -> None:
    job_id = _insert_job(service_settings, dataset, status=status, started_at=utcnow(), heartbeat_at=utcnow())
    stop_later.append(job_id)
    (service_settings.jobs_dir / job_id).mkdir(parents=True)
    _write_checkpoint(service_settings, job_id)
    with session_scope(service_settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(job_dir=str(service_settings.jobs_dir / job_id))
        )
    response = service.client.post(f"/jobs/{job_id}/resume")
    assert response.status_code == 409, response.text
    problem = response.json()
    assert phrase in problem["detail"] and problem["code"] == "conflict"
    assert _row(service_settings, job_id).status == status  # type: ignore[union-attr]


def test_resuming_without_a_checkpoint_is_409(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    with_dir = _finished(service_settings, dataset, status="failed", error_reason="internal")
    without_dir = _insert_job(service_settings, dataset, status="cancelled", finished_at=utcnow())
    for job_id in (with_dir, without_dir):
        response = service.client.post(f"/jobs/{job_id}/resume", json={"max_epochs": 2})
        assert response.status_code == 409, response.text
        assert "no checkpoint" in response.json()["detail"]
        assert _row(service_settings, job_id).status in ("failed", "cancelled")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [{"max_epochs": 2}, {"max_epochs": 0}, {"max_epochs": 1001}, {"max_epochs": "many"}, {"epochs": 5}],
)
def test_resume_body_errors_are_422_on_the_field(
    service: Service, service_settings: Settings, dataset: str, body: dict[str, Any]
) -> None:
    job_id = _finished(
        service_settings,
        dataset,
        spec=tiny_spec(dataset, training={"max_epochs": 3}),
        status="failed",
        error_reason="internal",
    )
    _write_checkpoint(service_settings, job_id)
    response = service.client.post(f"/jobs/{job_id}/resume", json=body)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["body", next(iter(body))]]
    job = _row(service_settings, job_id)
    assert job is not None and job.status == "failed" and job.max_epochs == 3


def test_resume_clears_the_outcome_and_extends_the_training(service_settings: Settings, dataset: str) -> None:
    """The exact row a resume leaves, read back in its transaction (rolled back: never sent)."""
    job_id = _finished(
        service_settings,
        dataset,
        status="failed",
        error_reason="worker_lost",
        error_message="the worker went away",
        cancel_requested_at=utcnow(),
        enqueued_at=utcnow(),
        lease_expires_at=utcnow(),
        restarts=2,
        attempt=3,
        epoch=0,
    )
    _write_checkpoint(service_settings, job_id, CKPT_BEST)
    latest = _write_checkpoint(service_settings, job_id, CKPT_LATEST)
    session = get_sessionmaker(service_settings.database_url)()
    try:
        job = jobs.resume_job(
            session, settings=service_settings, job_id=job_id, max_epochs=5, principal=ADMIN
        )
        session.expire_all()
        row = session.get(Job, job_id)
        assert row is not None and row is job
        assert row.status == JobStatus.queued
        assert (row.finished_at, row.error_reason, row.error_message) == (None, None, None)
        assert (row.cancel_requested_at, row.enqueued_at, row.lease_expires_at) == (None, None, None)
        assert row.restarts == 0 and row.attempt == 3 and row.epoch == 0
        assert row.max_epochs == 5 and row.spec["training"]["max_epochs"] == 5
        assert JobSpec.model_validate(row.spec).training.max_epochs == 5
        event = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        ).first()
        assert event is not None and event.kind == "state"
        # The latest checkpoint is the one to continue from.
        assert event.message == f"resume requested (from {latest.name}; max_epochs 5)"
    finally:
        session.rollback()
        session.close()
    assert _row(service_settings, job_id).status == "failed"  # type: ignore[union-attr]


def test_a_resume_that_loses_a_race_is_409(
    service_settings: Settings, dataset: str, stop_later: list[str]
) -> None:
    job_id = _finished(service_settings, dataset, status="failed", error_reason="internal")
    stop_later.append(job_id)
    _write_checkpoint(service_settings, job_id)
    session = get_sessionmaker(service_settings.database_url)()
    try:
        loaded = session.get(Job, job_id)  # read as failed (held: the identity map is weak)
        assert loaded is not None
        with session_scope(service_settings.database_url) as other:
            other.execute(update(Job).where(Job.id == job_id).values(status="running"))
        with pytest.raises(Conflict, match="changed meanwhile"):
            jobs.resume_job(
                session, settings=service_settings, job_id=job_id, max_epochs=None, principal=ADMIN
            )
    finally:
        session.rollback()
        session.close()


def test_a_failed_job_resumes_through_the_queue(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = _finished(
        service_settings,
        dataset,
        status="failed",
        error_reason="worker_lost",
        error_message="the worker went away",
        restarts=2,
    )
    _write_checkpoint(service_settings, job_id)
    before = utcnow()

    response = service.client.post(f"/jobs/{job_id}/resume", json={"max_epochs": 4})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"] == job_id and job["status"] == "queued"
    assert job["error"] is None and job["finished_at"] is None and job["cancel_requested"] is False
    assert job["restarts"] == 0
    assert job["progress"]["max_epochs"] == 4 and job["spec"]["training"]["max_epochs"] == 4

    row = _row(service_settings, job_id)
    assert row is not None and row.max_epochs == 4 and row.spec["training"]["max_epochs"] == 4
    # Sent to the broker after the commit, as POST /jobs sends a new job (a second for clock rounding).
    assert row.enqueued_at is not None and row.enqueued_at >= before - timedelta(seconds=1)
    messages = [e["message"] for e in service.events(job_id)]
    assert "resume requested (from ckpt_latest.pth; max_epochs 4)" in messages

    # The worker takes it again; its dataset (or the stand-in checkpoint) fails it at once.
    done = service.wait(job_id, timeout=180)
    assert done["status"] == "failed", done
    assert done["error"]["reason"] in ("dataset_error", "invalid_checkpoint"), done["error"]
    messages = [e["message"] for e in service.events(job_id)]
    resumed_at = messages.index("resume requested (from ckpt_latest.pth; max_epochs 4)")
    assert any("running on" in m for m in messages[resumed_at:]), messages
    row = _row(service_settings, job_id)
    assert row is not None and row.restarts == 0 and row.cancel_requested_at is None


def test_a_cancelled_job_without_a_body_resumes_with_its_max_epochs(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    job_id = _finished(service_settings, dataset, status="cancelled", cancel_requested_at=utcnow())
    _write_checkpoint(service_settings, job_id, CKPT_BEST)
    response = service.client.post(f"/jobs/{job_id}/resume")
    assert response.status_code == 202, response.text
    assert response.json()["progress"]["max_epochs"] == 1 and response.json()["cancel_requested"] is False
    assert "resume requested (from ckpt_best.pth; max_epochs 1)" in [
        e["message"] for e in service.events(job_id)
    ]
    service.wait(job_id, timeout=180)


@pytest.mark.parametrize(
    ("content", "status"),
    [(None, 404), (b"", 404), (b"{}", 404), (b'{"max_epochs": null}', 404), (b"null", 422), (b"[]", 422)],
)
def test_the_resume_body_is_optional_and_an_object(
    service: Service, content: bytes | None, status: int
) -> None:
    # An unknown job: a body that is accepted reaches the lookup (404), one that is not is a 422.
    headers = {"content-type": "application/json"} if content is not None else {}
    response = service.client.post("/jobs/nope/resume", content=content, headers=headers)
    assert response.status_code == status, response.text
