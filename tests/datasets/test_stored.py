"""An archive uploaded through the API to a service whose store is S3: stored before the 201, pulled
whole by a machine with another home (as a worker's training process resolves it), deleted with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.datasets import service as datasets
from app.datasets.demo import write_shapes_yolo
from app.datasets.models import Dataset
from app.datasets.schemas import DatasetSpec
from app.datasets.stored import dataset_key
from app.db import session_scope
from app.settings import Settings
from app.storage import S3Store
from app.testing import S3Server
from tests.datasets.test_router import SPEC, upload_multipart
from tests.remote_store import other_home, serve_with_store
from tests.support import Service, zip_folder

pytestmark = [pytest.mark.backends("sqlite")]

PREFIX = "stored-datasets"


@pytest.fixture(scope="module")
def remote(backend: Any, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serve_with_store(backend, s3, tmp_path_factory.mktemp("api-home"), PREFIX) as running:
        yield running


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _upload_with_store(
    remote: Service, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, name: str
) -> str:
    """A YOLO dataset uploaded through the API of `remote` (whose store is S3); this process gets the
    store's credentials too. Returns the dataset's id."""
    for variable, value in s3.env.items():
        monkeypatch.setenv(variable, value)
    folder = write_shapes_yolo(tmp_path / "yolo", SPEC)
    response = upload_multipart(remote, zip_folder(folder, wrap="shapes"), name=name)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_an_upload_is_stored_pulled_by_another_home_and_deleted(
    backend: Any, remote: Service, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = _upload_with_store(remote, s3, tmp_path, monkeypatch, name="stored")
    api_copy = datasets.upload_folder(Settings(home=remote.home), dataset_id)
    store = S3Store(s3.bucket, PREFIX, client=s3.client())
    stored = {info.key for info in store.list(dataset_key(dataset_id))}
    assert stored == {dataset_key(dataset_id, relative) for relative in _tree(api_copy)}

    # A worker's home: the same database and store, no dataset files.
    worker = other_home(backend, remote, s3, tmp_path / "worker-home", PREFIX)
    with session_scope(worker.database_url) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        root = datasets.dataset_root(worker, row)
    local = datasets.upload_folder(worker, dataset_id)
    assert root.is_relative_to(local.resolve())
    assert _tree(local) == _tree(api_copy)

    assert remote.client.delete(f"/datasets/{dataset_id}").status_code == 204
    assert store.list(dataset_key(dataset_id)) == []


def test_resolving_an_upload_to_pull_holds_no_connection(
    backend: Any, remote: Service, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /jobs and a training process resolve a dataset in their request's session: a download from
    the store (minutes for a large dataset) must not hold its pooled connection."""
    dataset_id = _upload_with_store(remote, s3, tmp_path, monkeypatch, name="pulled")
    worker = other_home(backend, remote, s3, tmp_path / "worker-home", PREFIX)
    spec = DatasetSpec(id=dataset_id)
    seen: list[bool] = []  # whether the session held a transaction when the pull started
    real_fetch = datasets.fetch_upload

    def fetch(store: Any, key: str, target: Path) -> bool:
        seen.append(session.in_transaction())
        return real_fetch(store, key, target)

    monkeypatch.setattr(datasets, "fetch_upload", fetch)
    with session_scope(worker.database_url) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        assert datasets.needs_pull(worker, row)
        assert session.in_transaction()
        resolved = datasets.resolve_spec(session, settings=worker, spec=spec, scope=None)
        assert seen == [False]
        assert resolved.root.is_relative_to(datasets.upload_folder(worker, dataset_id).resolve())
        # Present now: resolving it again finds the folder (nothing to download) and keeps the
        # session's transaction.
        session.get(Dataset, dataset_id)
        again = datasets.resolve_spec(session, settings=worker, spec=spec, scope=None)
        assert again.root == resolved.root
        assert session.in_transaction()
    assert seen == [False, True]
