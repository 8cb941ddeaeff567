"""Nothing accepted is lost or stuck: duplicate deliveries, dead workers, lost messages, killed children."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs import service as jobs
from app.jobs.files import RESULT_FILE
from app.jobs.models import Job, JobStatus
from app.jobs.schemas import JobSpec
from app.settings import Settings
from tests.support import Service, make_shapes, tiny_spec
from worker import runner
from worker.outcome import record_outcome
from worker.sweeper import sweep_once


def _insert_job(settings: Settings, dataset: str, **values: object) -> str:
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(session, spec=JobSpec.model_validate(tiny_spec(dataset)), settings=settings)
        if values:
            session.execute(update(Job).where(Job.id == job.id).values(**values))
        return job.id


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "recovery", splits=(("train", 4), ("valid", 2)))
    return "recovery"


def test_running_job_whose_worker_went_silent_is_failed_as_worker_lost(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    long_ago = utcnow() - timedelta(hours=1)
    job_id = _insert_job(
        service_settings, dataset, status="running", started_at=long_ago, heartbeat_at=long_ago
    )
    failed, _ = sweep_once(service_settings)
    assert job_id in failed
    job = service.job(job_id)
    assert job["status"] == "failed" and job["error"]["reason"] == "worker_lost"
    assert "submit the job again" in job["error"]["message"]
    # A second pass (or a late result from the lost worker) does not move it again.
    assert job_id not in sweep_once(service_settings)[0]
    with session_scope(service_settings.database_url) as session:
        assert not lifecycle.finish(session, job_id=job_id, status=JobStatus.succeeded)


def test_queued_job_whose_message_was_never_sent_is_sent_and_runs(
    service: Service, service_settings: Settings, tmp_path: Path
) -> None:
    # A dataset that fails fast shows the job was picked up without spending a training.
    root = make_shapes(service.datasets_dir, "recovery-bad", splits=(("train", 3), ("valid", 2)))
    (root / "train" / "_annotations.coco.json").write_text("[]")
    job_id = _insert_job(service_settings, "recovery-bad", created_at=utcnow() - timedelta(minutes=5))
    _, resent = sweep_once(service_settings)
    assert job_id in resent
    done = service.wait(job_id, timeout=120)
    assert done["status"] == "failed" and done["error"]["reason"] == "dataset_error"


def test_duplicate_delivery_of_a_finished_job_does_nothing(
    service: Service, service_settings: Settings, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _insert_job(service_settings, dataset, status="cancelled", finished_at=utcnow())
    before = service.job(job_id)
    for key, value in {
        "SGJOBS_HOME": str(service_settings.home),
        "SGJOBS_DATABASE_URL": service_settings.database_url,
        "SGJOBS_BROKER_URL": service_settings.broker_url,
    }.items():
        monkeypatch.setenv(key, value)
    from app.settings import get_settings
    from worker.tasks import train_job

    get_settings.cache_clear()
    try:
        assert train_job.run(job_id) == "skipped"
    finally:
        get_settings.cache_clear()
    assert service.job(job_id) == before


def test_training_process_killed_by_the_kernel_fails_as_out_of_memory(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    job_id = _insert_job(
        service_settings, dataset, status="running", started_at=utcnow(), heartbeat_at=utcnow()
    )
    assert record_outcome(
        service_settings, job_id=job_id, job_dir=tmp_path, returncode=-9, killed_for_cancel=False
    ) == ("failed")
    job = service.job(job_id)
    assert job["error"]["reason"] == "out_of_memory" and "batch_size" in job["error"]["message"]


def test_training_process_that_crashes_fails_as_internal_with_its_last_output(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    job_id = _insert_job(
        service_settings, dataset, status="running", started_at=utcnow(), heartbeat_at=utcnow()
    )
    (tmp_path / "console.log").write_text("Traceback (most recent call last):\nSegmentation fault\n")
    record_outcome(service_settings, job_id=job_id, job_dir=tmp_path, returncode=139, killed_for_cancel=False)
    job = service.job(job_id)
    assert job["error"]["reason"] == "internal"
    assert "code 139" in job["error"]["message"] and "Segmentation fault" in job["error"]["message"]
    assert job["artifacts"] == {"console_log": str(tmp_path / "console.log")}


def test_result_file_decides_the_outcome(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    job_id = _insert_job(
        service_settings, dataset, status="running", started_at=utcnow(), heartbeat_at=utcnow()
    )
    (tmp_path / RESULT_FILE).write_text(
        json.dumps({"status": "succeeded", "best_value": 0.75, "device": "cuda"})
    )
    record_outcome(service_settings, job_id=job_id, job_dir=tmp_path, returncode=0, killed_for_cancel=False)
    job = service.job(job_id)
    assert job["status"] == "succeeded" and job["best_metric"]["value"] == 0.75 and job["device"] == "cuda"


SILENT_CHILD = [
    sys.executable,
    "-c",
    "import sys, time; print('stuck', sys.argv[1], flush=True); time.sleep(120)",
]


def test_training_process_that_makes_no_progress_is_killed_and_failed(
    service: Service,
    service_settings: Settings,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "TRAIN_COMMAND", SILENT_CHILD)
    settings = service_settings.model_copy(update={"heartbeat_seconds": 0.2, "stall_timeout_seconds": 1.5})
    job_id = _insert_job(settings, dataset, status="running", started_at=utcnow(), heartbeat_at=utcnow())
    assert runner.run_training_process(settings, job_id=job_id, job_dir=tmp_path) == "failed"
    job = service.job(job_id)
    assert job["error"]["reason"] == "internal"
    assert "no progress" in job["error"]["message"] and "stuck" in job["error"]["message"]


def test_training_process_that_ignores_a_cancel_is_killed_after_the_grace_period(
    service: Service,
    service_settings: Settings,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "TRAIN_COMMAND", SILENT_CHILD)
    settings = service_settings.model_copy(update={"heartbeat_seconds": 0.2, "cancel_grace_seconds": 0.5})
    job_id = _insert_job(settings, dataset, status="running", started_at=utcnow(), heartbeat_at=utcnow())
    assert service.client.post(f"/jobs/{job_id}/cancel").status_code == 202
    assert runner.run_training_process(settings, job_id=job_id, job_dir=tmp_path) == "cancelled"
    job = service.job(job_id)
    assert job["status"] == "cancelled" and job["error"] is None
