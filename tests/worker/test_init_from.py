"""Starting from another job's checkpoint: what is refused up front and what fails the job."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import service as jobs
from app.jobs.models import Job
from app.jobs.schemas import JobSpec
from app.settings import Settings
from tests.support import ADMIN, Service, make_shapes, tiny_spec


def _finished_job(settings: Settings, dataset: str, *, model: str, checkpoint: Path) -> str:
    """A succeeded job row in `checkpoint`'s folder whose recorded best checkpoint is `checkpoint`."""
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(
            session, principal=ADMIN, spec=JobSpec.model_validate(tiny_spec(dataset)), settings=settings
        )
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="succeeded",
                model=model,
                finished_at=utcnow(),
                job_dir=str(checkpoint.parent),
                artifacts={"ckpt_best": str(checkpoint)},
            )
        )
        return job.id


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "init-from", splits=(("train", 4), ("valid", 2)))
    return "init-from"


def test_init_from_a_job_of_another_model_is_422(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt_best.pth"
    checkpoint.write_bytes(b"x")
    source = _finished_job(service_settings, dataset, model="yolo_nas_m", checkpoint=checkpoint)
    response = service.post_job(tiny_spec(dataset, init_from={"job_id": source}))
    assert response.status_code == 422
    assert "yolo_nas_m" in response.json()["detail"]


def test_init_from_a_job_whose_checkpoint_is_gone_is_422(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    source = _finished_job(service_settings, dataset, model="yolo_nas_s", checkpoint=tmp_path / "missing.pth")
    response = service.post_job(tiny_spec(dataset, init_from={"job_id": source}))
    assert response.status_code == 422
    assert "no checkpoint" in response.json()["detail"]


def test_init_from_a_checkpoint_outside_the_jobs_directory_is_422(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    # Recorded, and a real file, but not inside the source job's own directory.
    outside = tmp_path / "elsewhere" / "ckpt_best.pth"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    source = _finished_job(service_settings, dataset, model="yolo_nas_s", checkpoint=tmp_path / "job" / "x")
    with session_scope(service_settings.database_url) as session:
        session.execute(update(Job).where(Job.id == source).values(artifacts={"ckpt_best": str(outside)}))
    response = service.post_job(tiny_spec(dataset, init_from={"job_id": source}))
    assert response.status_code == 422
    assert "no checkpoint" in response.json()["detail"]


def test_corrupt_init_checkpoint_fails_the_job_as_invalid_checkpoint(
    service: Service, service_settings: Settings, dataset: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ckpt_best.pth"
    checkpoint.write_bytes(b"this is not a torch checkpoint")
    source = _finished_job(service_settings, dataset, model="yolo_nas_s", checkpoint=checkpoint)
    job = service.submit(tiny_spec(dataset, init_from={"job_id": source}))
    done = service.wait(job["id"], timeout=180)
    assert done["status"] == "failed"
    assert done["error"]["reason"] == "invalid_checkpoint"
    assert "ckpt_best.pth" in done["error"]["message"] and source in done["error"]["message"]
    assert not (Path(done["job_dir"]) / "checkpoints").exists()


def test_the_init_checkpoint_is_found_with_no_connection_held(
    service_settings: Settings, dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training process finds what its job starts from in its first session; with a remote store the
    checkpoint is a download (minutes), which must not hold the session's pooled connection."""
    from app.jobs import stored
    from worker import train_process

    checkpoint = tmp_path / "ckpt_best.pth"
    checkpoint.write_bytes(b"x")
    source = _finished_job(service_settings, dataset, model="yolo_nas_s", checkpoint=checkpoint)
    spec = JobSpec.model_validate(tiny_spec(dataset, init_from={"job_id": source}))
    in_transaction: list[bool] = []
    real_local_checkpoint = stored.local_checkpoint

    def local_checkpoint(settings: Settings, job: Job, *kinds: str) -> Path | None:
        in_transaction.append(session.in_transaction())
        return real_local_checkpoint(settings, job, *kinds)

    monkeypatch.setattr(stored, "local_checkpoint", local_checkpoint)
    with session_scope(service_settings.database_url) as session:
        session.get(Job, source)  # the training process's session has read its job by then
        found, label = train_process._init_checkpoint(session, service_settings, spec, {})
    assert in_transaction == [False]
    assert (found, label) == (checkpoint, f"job {source}")
