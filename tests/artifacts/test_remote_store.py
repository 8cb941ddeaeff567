"""A job's files read by the API from a remote store (SeaweedFS's S3 gateway), through real HTTP.

The service runs with `SGJOBS_STORAGE_URL=s3://...` and a home of its own. The job's row is one a
worker on another machine left: succeeded, its `job_dir` a path that does not exist here. Its files
are in the store under `jobs/<id>/...`, as that worker uploads them: a real YOLO-NAS-S checkpoint
(`tests.weights.standins`), the console log and a TensorBoard event file. No training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import files
from app.jobs.models import Job, JobStatus
from app.settings import Settings
from app.storage import CACHE_FOLDER, S3Store
from app.testing import S3Server
from tests.prediction.helpers import encode, scene
from tests.remote_store import serve_with_store
from tests.support import Service, insert_job, make_unreadable_dataset

pytestmark = [pytest.mark.backends("sqlite")]

PREFIX = "remote-api"
RUN = "checkpoints/train/RUN_20260101_000000_000000"
EVENTS = "events.out.tfevents.1700000000.worker-host.4242.0"


@pytest.fixture(scope="module")
def remote(backend: Any, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serve_with_store(backend, s3, tmp_path_factory.mktemp("api-home"), PREFIX) as running:
        yield running


@pytest.fixture(scope="module")
def settings(backend: Any, remote: Service, s3: S3Server) -> Settings:
    return Settings(
        home=remote.home,
        database_url=backend.database_url,
        broker_url=backend.broker_url,
        task_queue=backend.queue,
        storage_url=s3.storage_url(PREFIX),
    )


@pytest.fixture(scope="module")
def store(s3: S3Server) -> S3Store:
    return S3Store(s3.bucket, PREFIX, client=s3.client())


@pytest.fixture(scope="module")
def dataset(remote: Service) -> str:
    # A job the worker might pick up fails at once at its dataset check, never training.
    return make_unreadable_dataset(remote.datasets_dir, "remote-store-bad")


def _stored_job(settings: Settings, store: S3Store, dataset: str, standins: Path) -> str:
    """A succeeded job trained elsewhere, its files in the store."""
    job_id = insert_job(settings, dataset, status=JobStatus.succeeded, finished_at=utcnow())
    worker_dir = f"/nonexistent/worker-home/jobs/{job_id}"
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(job_dir=worker_dir, artifacts={"ckpt_best": f"{worker_dir}/{RUN}/ckpt_best.pth"})
        )
    store.put_file(files.job_key(job_id, f"{RUN}/ckpt_best.pth"), standins / "s5_named.pth")
    sources = {"console.log": b"epoch 1 done\n", f"{RUN}/{EVENTS}": b"tensorboard events"}
    for relative, data in sources.items():
        path = settings.home / "upload-source" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        store.put_file(files.job_key(job_id, relative), path)
    return job_id


@pytest.fixture(scope="module")
def job_id(settings: Settings, store: S3Store, dataset: str, standins: Path) -> str:
    return _stored_job(settings, store, dataset, standins)


def test_artifacts_are_listed_and_downloaded_from_the_store(
    remote: Service, job_id: str, standins: Path
) -> None:
    listing = remote.client.get(f"/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    items = {item["name"]: item for item in listing.json()["items"]}
    checkpoint = standins / "s5_named.pth"
    assert {name: (item["kind"], item["size"]) for name, item in items.items()} == {
        f"{RUN}/ckpt_best.pth": ("ckpt_best", checkpoint.stat().st_size),
        "console.log": ("console_log", len(b"epoch 1 done\n")),
        f"{RUN}/events.out.tfevents.1700000000": ("tensorboard", len(b"tensorboard events")),
    }
    best = remote.client.get(items[f"{RUN}/ckpt_best.pth"]["url"])
    assert best.status_code == 200
    assert best.content == checkpoint.read_bytes()
    assert best.headers["content-length"] == str(checkpoint.stat().st_size)
    assert best.headers["content-disposition"] == 'attachment; filename="ckpt_best.pth"'
    events = remote.client.get(items[f"{RUN}/events.out.tfevents.1700000000"]["url"])
    assert events.content == b"tensorboard events"
    assert events.headers["content-disposition"] == 'attachment; filename="events.out.tfevents.1700000000"'
    # Only listed names: never a key joined from the request.
    for name in (f"{RUN}/{EVENTS}", "result.json", "../other/console.log"):
        assert remote.client.get(f"/jobs/{job_id}/artifacts/{name}").status_code == 404, name


def test_predict_hands_the_cached_copy_of_the_stored_checkpoint_to_the_inference_process(
    remote: Service, job_id: str, standins: Path
) -> None:
    """The API downloads the job's best checkpoint into its store cache and the inference process
    loads that copy. The stand-in carries class names but none of the preprocessing a trained job's
    checkpoint has, so the load ends in the 409 for such a file (a served prediction of a job trained
    through a worker with its own home is the end-to-end test's)."""
    answer = remote.client.post(
        "/predict",
        data={"job_id": job_id},
        files=[("files", ("scene.png", encode(scene(96, 64, seed=1)), "image/png"))],
        timeout=300,
    )
    assert answer.status_code == 409, answer.text
    assert "ckpt_best.pth carries no class names or preprocessing" in answer.json()["detail"]
    cached = remote.home / CACHE_FOLDER / files.job_key(job_id, f"{RUN}/ckpt_best.pth")
    assert cached.read_bytes() == (standins / "s5_named.pth").read_bytes()


def _tiny_onnx(path: Path) -> Path:
    """A valid ONNX file with an export's input (uint8 [1, 3, 64, 64]): what the inference process
    reads to describe an export it reuses."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["num_detections"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("num_detections", TensorProto.UINT8, [1, 3, 64, 64])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_export_reuses_a_stored_export_no_older_than_the_stored_checkpoint(
    remote: Service, settings: Settings, store: S3Store, dataset: str, standins: Path
) -> None:
    job_id = _stored_job(settings, store, dataset, standins)
    onnx_file = _tiny_onnx(settings.home / "upload-source" / "model.onnx")
    key = files.job_key(job_id, files.EXPORT_NAME)
    store.put_file(key, onnx_file)
    before = store.stat(key)
    answer = remote.client.post(f"/jobs/{job_id}/export", timeout=300)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["cached"] is True
    assert body["input_shape"] == [1, 3, 64, 64]
    assert body["artifact"]["size"] == onnx_file.stat().st_size
    assert store.stat(key) == before  # nothing uploaded again
    assert remote.client.get(body["artifact"]["url"]).content == onnx_file.read_bytes()


def test_export_does_not_reuse_a_stored_export_older_than_the_checkpoint(
    remote: Service, settings: Settings, store: S3Store, dataset: str, standins: Path
) -> None:
    job_id = _stored_job(settings, store, dataset, standins)
    key = files.job_key(job_id, files.EXPORT_NAME)
    store.put_file(key, _tiny_onnx(settings.home / "upload-source" / "old.onnx"))
    before = store.stat(key)
    time.sleep(1.1)  # S3 keeps modification times to the second
    store.put_file(files.job_key(job_id, f"{RUN}/ckpt_best.pth"), standins / "s5_named.pth")
    answer = remote.client.post(f"/jobs/{job_id}/export", timeout=300)
    # A new export is made from the checkpoint, which the stand-in (no preprocessing) cannot give.
    assert answer.status_code == 409, answer.text
    assert "carries no class names or preprocessing" in answer.json()["detail"]
    assert store.stat(key) == before


def test_delete_removes_the_jobs_objects(
    remote: Service, settings: Settings, store: S3Store, dataset: str, standins: Path
) -> None:
    doomed = _stored_job(settings, store, dataset, standins)
    assert remote.client.get(f"/jobs/{doomed}/artifacts/console.log").status_code == 200
    assert remote.client.delete(f"/jobs/{doomed}").status_code == 204
    assert store.list(files.job_key(doomed)) == []
    assert remote.client.get(f"/jobs/{doomed}/artifacts").status_code == 404
