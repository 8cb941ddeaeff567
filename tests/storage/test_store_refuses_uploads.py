"""A store that refuses the API (here: a wrong secret key, so every request is a 403 from SeaweedFS):
a dataset upload or a weights registration answers 503 naming the store, and leaves nothing
registered, on the API's disk or in the store."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.datasets.demo import write_shapes_yolo
from app.testing import S3Server
from tests.datasets.test_router import SPEC, upload_multipart
from tests.remote_store import serve_with_store
from tests.support import Service, zip_folder
from tests.weights.test_router import upload

pytestmark = [pytest.mark.backends("sqlite")]

PREFIX = "refusing-store"


@pytest.fixture(scope="module")
def refused(backend: Any, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    wrong_secret = dataclasses.replace(s3, secret_key="not-the-secret")
    with serve_with_store(backend, wrong_secret, tmp_path_factory.mktemp("refused"), PREFIX) as running:
        yield running


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def _assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "storage_unavailable", body
    assert response.headers["retry-after"]
    assert "object store" in body["detail"], body


def test_a_dataset_upload_is_503_and_leaves_nothing(refused: Service, s3: S3Server, tmp_path: Path) -> None:
    folder = write_shapes_yolo(tmp_path / "yolo", SPEC)
    _assert_unavailable(upload_multipart(refused, zip_folder(folder, wrap="shapes"), name="refused"))
    assert refused.client.get("/datasets").json()["items"] == []
    assert _files(refused.home / "datasets" / "uploads") == []
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}/")
    assert listed.get("KeyCount", 0) == 0


def test_a_weights_registration_is_503_and_leaves_nothing(
    refused: Service, s3: S3Server, standins: Path
) -> None:
    _assert_unavailable(upload(refused, standins / "s5_named.pth"))
    assert [w for w in refused.client.get("/weights").json()["items"] if w["source"] == "upload"] == []
    assert _files(refused.home / "weights" / "store") == []
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}/")
    assert listed.get("KeyCount", 0) == 0
