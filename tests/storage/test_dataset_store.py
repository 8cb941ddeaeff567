"""Uploaded datasets in an S3 store: pushed whole, pulled whole into place (never half), deleted."""

from __future__ import annotations

from pathlib import Path

from app.datasets.stored import dataset_key, fetch_upload, push_upload
from app.testing import S3Server
from tests.storage.conftest import make_s3_store


def _upload(folder: Path) -> dict[str, bytes]:
    files = {
        "data.yaml": b"names: [a]\n",
        "images/train/1.jpg": b"\xff\xd8jpeg",
        "labels/train/1.txt": b"0 .5 .5 .1 .1\n",
    }
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_pushed_upload_is_pulled_whole_into_place(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    files = _upload(tmp_path / "api" / "d1")
    push_upload(store, "d1", tmp_path / "api" / "d1")
    assert sorted(info.key for info in store.list(dataset_key("d1"))) == sorted(
        dataset_key("d1", relative) for relative in files
    )

    uploads = tmp_path / "worker" / "uploads"
    assert fetch_upload(store, "d1", uploads / "d1")
    assert _tree(uploads / "d1") == files
    # Only the dataset's folder: no scratch folder of the pull is left beside it.
    assert [p.name for p in uploads.iterdir()] == ["d1"]


def test_an_interrupted_pull_is_not_taken_for_the_dataset(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    files = _upload(tmp_path / "api" / "d2")
    push_upload(store, "d2", tmp_path / "api" / "d2")
    uploads = tmp_path / "worker" / "uploads"
    # What a crash mid-download leaves: a scratch folder with part of the files.
    (uploads / ".pulling-d2-dead").mkdir(parents=True)
    (uploads / ".pulling-d2-dead" / "data.yaml").write_bytes(files["data.yaml"])
    assert not (uploads / "d2").exists()

    assert fetch_upload(store, "d2", uploads / "d2")
    assert _tree(uploads / "d2") == files


def test_nothing_stored_pulls_nothing_and_deletion_removes_the_objects(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    uploads = tmp_path / "worker" / "uploads"
    assert not fetch_upload(store, "d3", uploads / "d3")
    assert not (uploads / "d3").exists()
    assert not uploads.exists() or list(uploads.iterdir()) == []

    _upload(tmp_path / "api" / "d3")
    push_upload(store, "d3", tmp_path / "api" / "d3")
    store.delete_prefix(dataset_key("d3"))
    assert store.list(dataset_key("d3")) == []
