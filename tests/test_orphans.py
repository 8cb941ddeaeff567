"""The sweeper's removal of store folders no row owns: against SeaweedFS and a migrated SQLite
database of its own (rows of every owning table), and never on the local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import orphans
from app.datasets.models import Dataset
from app.db import session_scope
from app.migrate import upgrade
from app.settings import Settings
from app.storage import S3Store
from app.testing import S3Server
from app.weights.models import Weights
from tests.support import insert_job, make_shapes

PREFIX = "orphans"


def migrated(home: Path, **values: str) -> Settings:
    home.mkdir(parents=True)
    settings = Settings(home=home, **values)
    upgrade(settings.database_url)
    return settings


def owners(settings: Settings) -> dict[str, str]:
    """One row of each owning table; their ids by store folder."""
    make_shapes(settings.datasets_dir, "owned", splits=(("train", 2), ("valid", 1)))
    job_id = insert_job(settings, "owned", status="succeeded")
    with session_scope(settings.database_url) as session:
        dataset = Dataset(
            name="d", tenant="t", format="coco", path="uploads/d", status="ready",
            archive_bytes=1, size_bytes=1, file_count=1,
        )  # fmt: skip
        weights = Weights(
            name="w", tenant="t", model="yolo_nas_s", num_classes=1, size_bytes=1, sha256="0" * 64,
            source="upload",
        )  # fmt: skip
        session.add_all([dataset, weights])
        session.flush()
        return {"jobs": job_id, "datasets": dataset.id, "weights": weights.id}


def put(store: S3Store, key: str) -> None:
    store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=b"x")


def test_folders_without_a_row_are_removed_after_the_grace_period(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    settings = migrated(tmp_path / "home", storage_url=s3.storage_url(PREFIX))
    owned = owners(settings)
    store = S3Store(s3.bucket, PREFIX, client=s3.client())
    kept = [f"{folder}/{owner_id}/a/file" for folder, owner_id in owned.items()]
    kept.append("jobs/loose-object")  # beside the folders: not a folder of a deleted row
    gone = [f"{folder}/deleted{folder}/{name}" for folder in owned for name in ("one", "deep/two")]
    for key in kept + gone:
        put(store, key)

    # Just written: an upload that has not committed its row yet looks the same.
    assert orphans.remove_orphans(settings) == []
    assert sorted(info.key for info in store.list("")) == sorted(kept + gone)

    removed = orphans.remove_orphans(settings, grace_seconds=0)
    assert removed == sorted(f"{folder}/deleted{folder}" for folder in owned)
    assert sorted(info.key for info in store.list("")) == sorted(kept)
    assert orphans.remove_orphans(settings, grace_seconds=0) == []


def test_the_local_store_is_never_swept(tmp_path: Path) -> None:
    settings = migrated(tmp_path / "home")
    # A folder someone put in the datasets directory has no row, and is theirs.
    mine = make_shapes(settings.datasets_dir, "mine", splits=(("train", 2),))
    job_files = settings.jobs_dir / "no-such-job" / "a"
    job_files.mkdir(parents=True)
    assert orphans.remove_orphans(settings, grace_seconds=0) == []
    assert mine.is_dir() and job_files.is_dir()
