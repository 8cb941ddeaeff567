"""StoreCache (bounded local copies of a remote store) and Mirror / pull (a folder <-> a prefix)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from app.storage import LocalStore, Mirror, ObjectMissing, S3Store, StorageError, Store, StoreCache, pull
from app.testing import S3Server
from tests.storage.conftest import make_s3_store

SIZE = 100_000


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class CountingS3Store(S3Store):
    """Counts downloads (the store itself is the real one)."""

    downloads = 0

    def get_file(self, key: str, dest: Path) -> None:
        type(self).downloads += 1
        super().get_file(key, dest)


def test_cache_of_a_local_store_is_the_store_itself(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "home")
    own = write(store.local_path("w/a.pth"), b"a")
    cache = StoreCache(store, tmp_path / "cache", max_bytes=2**20)
    assert cache.local_file("w/a.pth") == own
    with pytest.raises(ObjectMissing):
        cache.local_file("w/none.pth")
    assert not (tmp_path / "cache").exists()


def test_cache_downloads_once_and_again_when_the_object_changes(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    store.put_file("m/best.pth", write(tmp_path / "v1", b"version 1"))
    cache = StoreCache(store, tmp_path / "cache", max_bytes=2**20)

    path = cache.local_file("m/best.pth")
    assert path == (tmp_path / "cache" / "m" / "best.pth").resolve() and path.read_bytes() == b"version 1"
    inode = path.stat().st_ino
    assert cache.local_file("m/best.pth") == path and path.stat().st_ino == inode  # a hit: not replaced

    store.put_file("m/best.pth", write(tmp_path / "v2", b"version 2"))  # same size, new ETag
    assert cache.local_file("m/best.pth").read_bytes() == b"version 2"

    store.delete("m/best.pth")
    with pytest.raises(ObjectMissing):
        cache.local_file("m/best.pth")
    assert not path.exists()  # a stale copy is not kept


def test_cache_serves_its_copy_while_the_store_is_unreachable(s3: S3Server, tmp_path: Path) -> None:
    import boto3

    store = make_s3_store(s3)
    store.put_file("m/best.pth", write(tmp_path / "v1", b"version 1"))
    StoreCache(store, tmp_path / "cache", max_bytes=2**20).local_file("m/best.pth")
    # The same objects, seen with credentials the store refuses: every request fails.
    wrong = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id="nobody",
        aws_secret_access_key="wrong",
    )
    down = StoreCache(S3Store(s3.bucket, store.prefix, client=wrong), tmp_path / "cache", max_bytes=2**20)
    assert down.local_file("m/best.pth").read_bytes() == b"version 1"
    with pytest.raises(StorageError):
        down.local_file("m/never-fetched.pth")


def test_cache_evicts_the_least_recently_used_never_the_newest(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    for name in "abc":
        store.put_file(f"k/{name}", write(tmp_path / name, os.urandom(SIZE)))
    cache = StoreCache(store, tmp_path / "cache", max_bytes=int(2.5 * SIZE))
    a = cache.local_file("k/a")
    b = cache.local_file("k/b")
    cache.local_file("k/a")  # a is now more recently used than b
    c = cache.local_file("k/c")
    assert (a.exists(), b.exists(), c.exists()) == (True, False, True)
    assert c.read_bytes() == (tmp_path / "c").read_bytes()

    small = StoreCache(store, tmp_path / "small", max_bytes=SIZE // 2)  # no file fits
    assert small.local_file("k/a").exists()
    last = small.local_file("k/b")
    assert last.exists() and not (tmp_path / "small" / "k" / "a").exists()


def test_cache_fetches_a_key_once_for_concurrent_readers(s3: S3Server, tmp_path: Path) -> None:
    store = CountingS3Store(s3.bucket, make_s3_store(s3).prefix, client=s3.client())
    data = os.urandom(SIZE)
    store.put_file("shared.pth", write(tmp_path / "src", data))
    # Two caches on one folder: like two processes, each with its own lock file descriptors.
    caches = [StoreCache(store, tmp_path / "cache", max_bytes=2**20) for _ in range(2)]
    results: list[bytes] = []

    def read(cache: StoreCache) -> None:
        results.append(cache.local_file("shared.pth").read_bytes())

    threads = [threading.Thread(target=read, args=(caches[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [data] * 6 and CountingS3Store.downloads == 1


def test_mirror_uploads_changed_files_only(store: Store, tmp_path: Path) -> None:
    run = tmp_path / "job" / "checkpoints"
    write(run / "RUN_1" / "ckpt_latest.pth", b"epoch 1")
    write(run / "RUN_1" / "events.out.tfevents.1", b"tb")
    write(run / "RUN_1" / "ckpt_best.pth.tmp", b"half written")
    mirror = Mirror(store, run, "jobs/j1/checkpoints")

    assert mirror.push() == [
        "jobs/j1/checkpoints/RUN_1/ckpt_latest.pth",
        "jobs/j1/checkpoints/RUN_1/events.out.tfevents.1",
    ]
    assert mirror.push() == []
    write(run / "RUN_1" / "ckpt_latest.pth", b"epoch 2 ...")
    write(run / "RUN_1" / "ckpt_best.pth", b"best")
    assert mirror.push() == [
        "jobs/j1/checkpoints/RUN_1/ckpt_best.pth",
        "jobs/j1/checkpoints/RUN_1/ckpt_latest.pth",
    ]
    assert mirror.push([run / "RUN_1" / "ckpt_best.pth"]) == []
    assert [info.key for info in store.list("jobs/j1")] == [
        "jobs/j1/checkpoints/RUN_1/ckpt_best.pth",
        "jobs/j1/checkpoints/RUN_1/ckpt_latest.pth",
        "jobs/j1/checkpoints/RUN_1/events.out.tfevents.1",
    ]

    # A resuming worker on another machine: everything comes down, and nothing goes up again.
    resumed = Mirror(store, tmp_path / "worker2" / "checkpoints", "jobs/j1/checkpoints")
    pulled = resumed.pull()
    assert sorted(p.name for p in pulled) == ["ckpt_best.pth", "ckpt_latest.pth", "events.out.tfevents.1"]
    assert (tmp_path / "worker2" / "checkpoints" / "RUN_1" / "ckpt_latest.pth").read_bytes() == b"epoch 2 ..."
    assert resumed.push() == []
    assert pull(store, "jobs/none", tmp_path / "empty") == []
