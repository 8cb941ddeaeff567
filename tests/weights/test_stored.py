"""Weights uploaded to a service whose store is S3: stored before the 201, read by a machine with
another home through its cache, deleted with the registration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.artifacts.service import weights_artifact_path
from app.db import session_scope
from app.jobs.files import EXPORT_NAME
from app.storage import S3Store
from app.testing import S3Server
from app.weights import service as weights
from app.weights.stored import WEIGHTS_NAME, weights_key
from tests.remote_store import other_home, serve_with_store
from tests.support import Service
from tests.weights.test_router import upload

pytestmark = [pytest.mark.backends("sqlite")]

PREFIX = "stored-weights"


@pytest.fixture(scope="module")
def remote(backend: Any, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serve_with_store(backend, s3, tmp_path_factory.mktemp("api-home"), PREFIX) as running:
        yield running


def test_weights_are_stored_read_by_another_home_and_deleted(
    backend: Any,
    remote: Service,
    s3: S3Server,
    standins: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    source = standins / "yolo_nas_s_coco.pth"
    response = upload(remote, source)
    assert response.status_code == 201, response.text
    weights_id = response.json()["id"]
    store = S3Store(s3.bucket, PREFIX, client=s3.client())
    stored = [info.key for info in store.list(weights_key(weights_id))]
    assert stored == [weights_key(weights_id, WEIGHTS_NAME)]

    worker = other_home(backend, remote, s3, tmp_path / "worker-home", PREFIX)
    assert not weights.weights_file(worker, weights_id).exists()
    # A job's init_from check asks the store; only the worker that trains downloads the file.
    assert weights.has_file(worker, weights_id)
    assert list(worker.home.rglob("*.pth")) == []
    local = weights.local_file(worker, weights_id)
    assert local is not None and local.is_relative_to(worker.home)
    assert local.read_bytes() == source.read_bytes()

    # The API's export is stored beside the weights; another home downloads that one.
    exported = remote.client.post(f"/weights/{weights_id}/export", json={}, timeout=300)
    assert exported.status_code == 200, exported.text
    name = exported.json()["artifact"]["name"]
    assert name == EXPORT_NAME
    stored_export = store.client.get_object(Bucket=s3.bucket, Key=f"{PREFIX}/{weights_key(weights_id, name)}")
    onnx = stored_export["Body"].read()
    assert onnx[:64] and onnx == remote.client.get(f"/weights/{weights_id}/artifacts/{name}").content
    with session_scope(worker.database_url) as session:
        fetched = weights_artifact_path(
            session, settings=worker, weights_id=weights_id, name=name, scope=None
        )
    assert fetched.is_relative_to(worker.home) and fetched.read_bytes() == onnx
    # Asked again, the API reuses its export instead of making and uploading another.
    again = remote.client.post(f"/weights/{weights_id}/export", json={}, timeout=300)
    assert again.status_code == 200 and again.json()["cached"] is True, again.text

    assert remote.client.delete(f"/weights/{weights_id}").status_code == 204
    assert store.list(weights_key(weights_id)) == []
    assert not weights.has_file(other_home(backend, remote, s3, tmp_path / "third-home", PREFIX), weights_id)
