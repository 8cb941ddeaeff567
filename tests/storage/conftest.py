"""A store fixture run once per kind of store (the S3 one on the suite's SeaweedFS server, `s3`)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.storage import LocalStore, S3Store, Store
from app.testing import S3Server

# Small, so that listing a few keys already takes several pages.
TEST_PAGE_SIZE = 3
# Small, so that a few-MB file already goes up and down in parts.
TEST_MULTIPART_BYTES = 5 * 2**20


def make_s3_store(server: S3Server) -> S3Store:
    """A store under a prefix of its own in the shared bucket: tests never see each other's keys."""
    return S3Store(
        server.bucket,
        f"t/{uuid.uuid4().hex[:12]}",
        client=server.client(),
        page_size=TEST_PAGE_SIZE,
        multipart_bytes=TEST_MULTIPART_BYTES,
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return make_s3_store(request.getfixturevalue("s3"))
