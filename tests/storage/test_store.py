"""Every store kind behaves alike: LocalStore on a folder, S3Store on a real SeaweedFS S3 server."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from app.settings import Settings
from app.storage import (
    LocalStore,
    ObjectMissing,
    S3Store,
    StorageError,
    Store,
    UnsafeKey,
    open_store,
    parse_storage_url,
)
from app.testing import S3Server
from tests.storage.conftest import TEST_MULTIPART_BYTES, TEST_PAGE_SIZE

KEY = "jobs/j1/checkpoints/train/RUN_x/ckpt_best.pth"
UNSAFE_KEYS = ["", "../x", "a/../../b", "/abs", "a//b", "a/./b", "./a", "a/", "a\\b", "a\x00b", "."]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_round_trip_of_a_multi_part_file(store: Store, tmp_path: Path) -> None:
    data = os.urandom(2 * TEST_MULTIPART_BYTES + 12345)
    store.put_file(KEY, write(tmp_path / "src" / "ckpt.pth", data))

    info = store.stat(KEY)
    assert info is not None and info.key == KEY and info.size == len(data)
    assert info.mtime.tzinfo is not None and abs(info.mtime - datetime.now(UTC)) < timedelta(minutes=1)
    if isinstance(store, S3Store):
        assert info.etag.endswith("-3")  # three parts: the transfer went multipart
    dest = tmp_path / "out" / "deep" / "ckpt.pth"
    store.get_file(KEY, dest)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["ckpt.pth"]  # no temporary file left beside it
    assert b"".join(store.open_stream(KEY, chunk_size=2**20)) == data
    assert all(len(chunk) <= 2**20 for chunk in store.open_stream(KEY, chunk_size=2**20))


def test_put_replaces_and_changes_the_version(store: Store, tmp_path: Path) -> None:
    store.put_file("a/b.txt", write(tmp_path / "one", b"first"))
    first = store.stat("a/b.txt")
    store.put_file("a/b.txt", write(tmp_path / "two", b"second!"))
    second = store.stat("a/b.txt")
    assert first is not None and second is not None
    assert (second.size, second.etag != first.etag) == (7, True)
    store.get_file("a/b.txt", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"second!"


def test_missing_objects(store: Store, tmp_path: Path) -> None:
    assert store.stat("no/such.bin") is None
    with pytest.raises(ObjectMissing) as missing:
        store.get_file("no/such.bin", tmp_path / "x")
    assert missing.value.status_code == 404 and not (tmp_path / "x").exists()
    with pytest.raises(ObjectMissing):
        store.open_stream("no/such.bin")
    store.delete("no/such.bin")  # nothing to delete is no error
    assert store.list("no") == []
    assert store.delete_prefix("no") == 0


def test_list_by_folder_prefix_across_pages(store: Store, tmp_path: Path) -> None:
    src = write(tmp_path / "f", b"x")
    keys = [f"jobs/a/{name}" for name in ("1", "2", "sub/3", "sub/4", "sub/deep/5", "6", "7", "8")]
    for key in [*keys, "jobs/ab/other", "jobs/top"]:
        store.put_file(key, src)
    assert len(keys) > 2 * TEST_PAGE_SIZE  # several pages for the S3 store

    listed = store.list("jobs/a")
    assert [info.key for info in listed] == sorted(keys)  # not jobs/ab: a prefix is a folder
    assert store.list("jobs/a/") == listed
    assert {info.size for info in listed} == {1}
    assert [info.key for info in store.list("jobs/a/sub")] == [
        "jobs/a/sub/3",
        "jobs/a/sub/4",
        "jobs/a/sub/deep/5",
    ]
    assert len(store.list("")) == len(keys) + 2

    assert store.delete_prefix("jobs/a") == len(keys)
    assert store.list("jobs/a") == []
    assert [info.key for info in store.list("jobs")] == ["jobs/ab/other", "jobs/top"]
    store.delete("jobs/top")
    assert store.stat("jobs/top") is None and store.stat("jobs/ab/other") is not None
    with pytest.raises(UnsafeKey):
        store.delete_prefix("")  # never the whole store


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(store: Store, tmp_path: Path, key: str) -> None:
    src = write(tmp_path / "f", b"x")
    for call in (
        lambda: store.put_file(key, src),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.stat(key),
        lambda: store.delete(key),
        lambda: store.open_stream(key),
    ):
        with pytest.raises(UnsafeKey) as refused:
            call()
        assert refused.value.status_code == 422
    if key not in ("", "a/"):  # "" lists everything; a folder prefix may end with "/"
        with pytest.raises(UnsafeKey):
            store.list(key)


def test_local_store_keys_are_files_under_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "home")
    assert store.is_local and store.local_path(KEY) == (tmp_path / "home" / KEY).resolve()
    own = write(store.local_path(KEY), b"in place")
    store.put_file(KEY, own)  # already at its own place: nothing to copy
    assert own.read_bytes() == b"in place"
    # A symlink inside the root that leads out of it is not followed.
    (tmp_path / "outside").mkdir()
    write(tmp_path / "outside" / "secret", b"s")
    (tmp_path / "home" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeKey):
        store.stat("link/secret")
    # Files still being written (our temporary names) are not listed.
    write(tmp_path / "home" / "jobs" / f".x{'.sgjobs-part'}", b"half")
    assert [info.key for info in store.list("jobs")] == [KEY]


def test_s3_failures_are_storage_errors_naming_the_place(s3: S3Server, tmp_path: Path) -> None:
    import boto3

    wrong = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id="nobody",
        aws_secret_access_key="wrong",
    )
    src = write(tmp_path / "f", b"x")
    with pytest.raises(StorageError) as failed:
        S3Store(s3.bucket, "p", client=wrong).put_file("a/b", src)
    assert failed.value.status_code == 503 and f"s3://{s3.bucket}/p/a/b" in failed.value.message
    with pytest.raises(StorageError) as failed:
        S3Store("no-such-bucket", client=s3.client()).list("x")
    assert "s3://no-such-bucket" in failed.value.message


def test_open_store_reads_the_setting_and_the_aws_environment(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(open_store(Settings(home=tmp_path)), LocalStore)
    assert open_store(Settings(home=tmp_path)).local_path("a") == (tmp_path / "a").resolve()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    store = open_store(Settings(home=tmp_path, storage_url=s3.storage_url("env/prefix/")))
    assert isinstance(store, S3Store) and store.url == f"s3://{s3.bucket}/env/prefix"
    store.put_file("k", write(tmp_path / "f", b"via env"))
    assert s3.client().get_object(Bucket=s3.bucket, Key="env/prefix/k")["Body"].read() == b"via env"


def test_a_store_opened_after_the_aws_environment_changed_signs_with_the_new_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # boto3's default session would keep the first keys it resolved for the life of the process.
    settings = Settings(home=tmp_path, storage_url="s3://bucket/prefix")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    keys = []
    for key_id in ("FIRSTKEY", "SECONDKEY", "FIRSTKEY"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"secret-of-{key_id}")
        client = cast(S3Store, open_store(settings)).client
        keys.append((client._request_signer._credentials.access_key, client))
    assert [key for key, _ in keys] == ["FIRSTKEY", "SECONDKEY", "FIRSTKEY"]
    # The same environment again gets the client made for it, not a new session per store.
    assert keys[0][1] is keys[2][1] and keys[0][1] is not keys[1][1]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("gs://bucket/x", "unknown scheme 'gs'"),
        ("/var/lib/sgjobs", "unknown scheme ''"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket/../up", "not a plain path"),
    ],
)
def test_bad_storage_urls_are_refused_at_settings_load(tmp_path: Path, url: str, error: str) -> None:
    with pytest.raises(ValueError, match="SGJOBS_STORAGE_URL") as refused:
        Settings(home=tmp_path, storage_url=url)
    assert error in str(refused.value)


def test_storage_url_parsing() -> None:
    assert parse_storage_url(" ").scheme == ""
    parsed = parse_storage_url("s3://my-bucket//a/b/")
    assert (parsed.scheme, parsed.bucket, parsed.prefix) == ("s3", "my-bucket", "a/b")
    assert Settings().storage_cache_max_bytes == 20 * 2**30
