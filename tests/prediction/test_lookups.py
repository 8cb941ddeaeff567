"""What /predict found for a succeeded job is reused for a few seconds, never past a deletion and never
for a caller who may not see the job (`app.prediction.lookups`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, update

from app.db import session_scope
from app.errors import NotFound
from app.jobs.files import CHECKPOINTS, CKPT_BEST
from app.jobs.models import Job
from app.jobs.states import JobStatus
from app.ml.layout import serving_onnx_path
from app.ml.types import CHECKPOINTS_DIR
from app.prediction.lookups import LookupCache
from app.prediction.service import Predictor, predictor
from app.settings import Settings
from tests.auth.helpers import make_key
from tests.prediction.helpers import encode, scene, trained_job
from tests.support import Service, insert_job, make_shapes

DATASET = "lookups-shapes"


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, DATASET, splits=(("train", 2), ("valid", 1)))
    return DATASET


def _finished_job(
    settings: Settings, dataset: str, status: JobStatus, checkpoint: bytes | Path
) -> tuple[str, Path]:
    """A finished job of the admin's with a best checkpoint in its own directory: the bytes given, or
    a copy of a file (with its serving ONNX file where it has one)."""
    job_id = insert_job(settings, dataset, status=status)
    best = settings.jobs_dir / job_id / CHECKPOINTS_DIR / "train" / "RUN_1" / CHECKPOINTS[CKPT_BEST]
    best.parent.mkdir(parents=True)
    if isinstance(checkpoint, Path):
        shutil.copyfile(checkpoint, best)
        if serving_onnx_path(checkpoint).is_file():
            # Copied after the checkpoint, so at least as new: the inference process serves it.
            shutil.copyfile(serving_onnx_path(checkpoint), serving_onnx_path(best))
    else:
        best.write_bytes(checkpoint)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(job_dir=str(settings.jobs_dir / job_id), artifacts={"ckpt_best": str(best)})
        )
    return job_id, best


def _find(settings: Settings, lookups: LookupCache, job_id: str, scope: str | None = None) -> Predictor:
    with session_scope(settings.database_url) as session:
        return predictor(
            session, settings=settings, job_id=job_id, weights_id=None, scope=scope, lookups=lookups
        )


def _drop_row(settings: Settings, job_id: str) -> None:
    """The job's row gone, its files left: only a lookup that skips the database still finds it."""
    with session_scope(settings.database_url) as session:
        session.execute(delete(Job).where(Job.id == job_id))


def test_a_succeeded_jobs_checkpoint_is_reused_while_its_file_is_there(
    service_settings: Settings, dataset: str
) -> None:
    lookups = LookupCache(ttl_seconds=60)
    job_id, best = _finished_job(service_settings, dataset, JobStatus.succeeded, b"stand-in")
    found = _find(service_settings, lookups, job_id)
    assert (found.job_id, found.checkpoint) == (job_id, best)
    _drop_row(service_settings, job_id)
    assert _find(service_settings, lookups, job_id) == found  # from the cache: the row is gone
    # Another tenant's caller is not answered from it: the database says 404.
    with pytest.raises(NotFound):
        _find(service_settings, lookups, job_id, scope="another-team")
    best.unlink()  # deleting a job removes its files: the cache stops answering at once
    with pytest.raises(NotFound):
        _find(service_settings, lookups, job_id)


@pytest.mark.parametrize("status", [JobStatus.failed, JobStatus.cancelled])
def test_a_job_that_may_be_resumed_is_looked_up_every_time(
    service_settings: Settings, dataset: str, status: JobStatus
) -> None:
    lookups = LookupCache(ttl_seconds=60)
    job_id, _ = _finished_job(service_settings, dataset, status, b"stand-in")
    _find(service_settings, lookups, job_id)
    _drop_row(service_settings, job_id)
    with pytest.raises(NotFound):
        _find(service_settings, lookups, job_id)


def test_the_reuse_ends_with_its_time(service_settings: Settings, dataset: str) -> None:
    lookups = LookupCache(ttl_seconds=0.3)
    job_id, _ = _finished_job(service_settings, dataset, JobStatus.succeeded, b"stand-in")
    _find(service_settings, lookups, job_id)
    _drop_row(service_settings, job_id)
    _find(service_settings, lookups, job_id)
    time.sleep(0.35)
    with pytest.raises(NotFound):
        _find(service_settings, lookups, job_id)


@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_predicting_with_a_deleted_or_unseen_job_is_404_at_once(
    service: Service, service_settings: Settings, dataset: str
) -> None:
    trained: dict[str, Any] = trained_job(service)
    job_id, _ = _finished_job(
        service_settings, dataset, JobStatus.succeeded, Path(trained["artifacts"]["ckpt_best"])
    )
    image = encode(scene(96, 64))

    def predict(client: httpx.Client) -> httpx.Response:
        files = [("files", ("a.png", image))]
        return client.post("/predict", data={"job_id": job_id}, files=files, timeout=300)

    first = predict(service.client)
    assert first.status_code == 200, first.text
    again = predict(service.client)
    assert again.json()["images"] == first.json()["images"]
    member = make_key(service_settings, "another-team")
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {member}"}) as client:
        refused = predict(client)
    assert refused.status_code == 404, refused.text
    assert service.client.delete(f"/jobs/{job_id}").status_code == 204
    gone = predict(service.client)
    assert gone.status_code == 404, gone.text
    assert job_id in gone.json()["detail"]
