"""`app.jobs.stored` against a real S3 store (SeaweedFS): a job's files listed from the store as
`app.jobs.files` lists its directory, and checkpoints downloaded into the store cache.

Small files with the names SG and the worker write; no training. S3 keeps modification times to the
second, so "newest" is set up with one pause between two rounds of uploads.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.auth.principal import DEFAULT_TENANT
from app.jobs import files, stored
from app.jobs.models import Job, JobStatus
from app.settings import Settings
from app.storage import CACHE_FOLDER, S3Store, open_store
from app.testing import S3Server

RUN_1 = "checkpoints/train/RUN_1"
RUN_2 = "checkpoints/train/RUN_2"
EVENTS = "events.out.tfevents.1700000000.worker-host.4242.0"


@pytest.fixture
def settings(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings of a machine with a home of its own and the S3 store under a fresh prefix."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    yield Settings(home=tmp_path / "api-home", storage_url=s3.storage_url(f"t/{uuid.uuid4().hex[:12]}"))


def _job(job_id: str = "j1") -> Job:
    # The worker's directory, on another machine: never read with a remote store.
    return Job(
        id=job_id,
        tenant=DEFAULT_TENANT,
        status=JobStatus.succeeded,
        model="yolo_nas_s",
        spec={},
        max_epochs=2,
        best_metric_name="mAP@0.50",
        job_dir="/nonexistent/worker-home/jobs/j1",
        artifacts={"ckpt_best": "/nonexistent/worker-home/jobs/j1/checkpoints/train/RUN_1/ckpt_best.pth"},
    )


def _put(store: S3Store, tmp_path: Path, job_id: str, relative: str, data: bytes) -> None:
    source = tmp_path / "src" / uuid.uuid4().hex
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    store.put_file(files.job_key(job_id, relative), source)


def _store(settings: Settings) -> S3Store:
    store = open_store(settings)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def uploaded(settings: Settings, tmp_path: Path) -> S3Store:
    """Job j1's files as the worker uploads them, in two rounds a second apart: RUN_2's best and
    RUN_1's latest are the newer ones (so neither key order nor run order decides)."""
    store = _store(settings)
    first = {
        f"{RUN_1}/ckpt_best.pth": b"old best",
        f"{RUN_2}/ckpt_latest.pth": b"old latest",
        f"{RUN_1}/average_model.pth": b"average",
        f"{RUN_1}/{EVENTS}": b"events 1",
        f"{RUN_2}/{EVENTS}": b"events 2",
    }
    second = {
        f"{RUN_2}/ckpt_best.pth": b"new best",
        f"{RUN_2}/ckpt_best.serving.onnx": b"serving onnx",
        f"{RUN_1}/ckpt_latest.pth": b"new latest!",
        f"{RUN_1}/ckpt_latest.previous.pth": b"previous latest, newest of all",
        f"{RUN_2}/ckpt_best.pth.123-abcd.tmp": b"half a checkpoint",
        f"{RUN_2}/averaging_snapshots.pkl": b"ten models",
        "console.log": b"log",
        "result.json": b"{}",
        "dataset/train.json": b"{}",
        "export/model.onnx": b"onnx",
        "export/model-320x320-b1-conf0.5-iou0.7.onnx": b"variant",
        "export/sub/model-x.onnx": b"not an export",
    }
    for relative, data in first.items():
        _put(store, tmp_path, "j1", relative, data)
    time.sleep(1.1)
    for relative, data in second.items():
        _put(store, tmp_path, "j1", relative, data)
    _put(store, tmp_path, "j10", f"{RUN_1}/ckpt_best.pth", b"another job's, a prefix of the same letters")
    return store


def test_lists_the_same_names_and_choices_as_a_job_directory(uploaded: S3Store) -> None:
    listed = stored.list_stored_files(uploaded, _job())
    assert {name: (f.kind, f.size) for name, f in listed.items()} == {
        f"{RUN_2}/ckpt_best.pth": ("ckpt_best", len(b"new best")),
        f"{RUN_1}/ckpt_latest.pth": ("ckpt_latest", len(b"new latest!")),
        f"{RUN_1}/average_model.pth": ("average_model", len(b"average")),
        "console.log": ("console_log", 3),
        f"{RUN_1}/events.out.tfevents.1700000000": ("tensorboard", len(b"events 1")),
        f"{RUN_2}/events.out.tfevents.1700000000": ("tensorboard", len(b"events 2")),
        "export/model.onnx": ("onnx", 4),
        "export/model-320x320-b1-conf0.5-iou0.7.onnx": ("onnx", len(b"variant")),
    }
    assert listed["console.log"].key == files.job_key("j1", "console.log")
    assert listed[f"{RUN_1}/events.out.tfevents.1700000000"].key == files.job_key("j1", f"{RUN_1}/{EVENTS}")
    # The order of `files.list_files`: checkpoints, console log, event files, exports (default first).
    assert list(listed)[3:] == [
        "console.log",
        f"{RUN_1}/events.out.tfevents.1700000000",
        f"{RUN_2}/events.out.tfevents.1700000000",
        "export/model.onnx",
        "export/model-320x320-b1-conf0.5-iou0.7.onnx",
    ]


def test_the_store_and_a_job_directory_list_alike(uploaded: S3Store, tmp_path: Path) -> None:
    """The same files in a job directory (mtimes as in the store) list under the same names."""
    job_dir = tmp_path / "worker-home" / "jobs" / "j1"
    for info in uploaded.list(files.job_key("j1")):
        path = job_dir / info.key.removeprefix("jobs/j1/")
        uploaded.get_file(info.key, path)
        stamp = info.mtime.timestamp()
        os.utime(path, (stamp, stamp))
    local = _job()
    local.job_dir, local.artifacts = str(job_dir), None
    on_disk = {name: f.kind for name, f in files.list_files(local).items()}
    in_store = {name: f.kind for name, f in stored.list_stored_files(uploaded, _job()).items()}
    assert list(in_store.items()) == list(on_disk.items())


def test_two_event_files_that_shorten_alike_keep_distinct_names(settings: Settings, tmp_path: Path) -> None:
    store = _store(settings)
    _put(store, tmp_path, "j1", f"{RUN_1}/events.out.tfevents.1700000000.host.1.0", b"a")
    _put(store, tmp_path, "j1", f"{RUN_1}/events.out.tfevents.1700000000.host.2.0", b"bb")
    listed = stored.list_stored_files(store, _job())
    assert {name: f.size for name, f in listed.items()} == {
        f"{RUN_1}/events.out.tfevents.1700000000": 1,
        f"{RUN_1}/events.out.tfevents.1700000000.1": 2,
    }


def test_nothing_stored_lists_nothing(settings: Settings) -> None:
    assert stored.list_stored_files(_store(settings), _job()) == {}
    assert stored.local_checkpoint(settings, _job(), files.CKPT_BEST, files.CKPT_LATEST) is None
    assert not stored.has_checkpoint(settings, _job(), files.CKPT_BEST)


def test_local_checkpoint_downloads_the_newest_with_its_serving_onnx_after_it(
    uploaded: S3Store, settings: Settings
) -> None:
    job = _job()
    cache = settings.home / CACHE_FOLDER
    best = stored.local_checkpoint(settings, job, files.CKPT_BEST)
    assert best == cache / files.job_key("j1", f"{RUN_2}/ckpt_best.pth")
    assert best.read_bytes() == b"new best"
    onnx = best.with_name("ckpt_best.serving.onnx")
    assert onnx.read_bytes() == b"serving onnx"
    assert onnx.stat().st_mtime_ns >= best.stat().st_mtime_ns
    # Again, from the cache: still the ONNX file no older than the checkpoint.
    assert stored.local_checkpoint(settings, job, files.CKPT_BEST) == best
    assert onnx.stat().st_mtime_ns >= best.stat().st_mtime_ns
    assert stored.has_checkpoint(settings, job, files.CKPT_BEST)


def test_local_checkpoint_takes_the_first_kind_present(
    uploaded: S3Store, settings: Settings, tmp_path: Path
) -> None:
    latest = stored.local_checkpoint(settings, _job(), files.CKPT_LATEST, files.CKPT_BEST)
    assert latest is not None and latest.read_bytes() == b"new latest!"
    # No serving ONNX file for it in the store: none beside its copy.
    assert not latest.with_name("ckpt_latest.serving.onnx").exists()
    _put(uploaded, tmp_path, "j2", f"{RUN_1}/ckpt_best.pth", b"only a best")
    found = stored.local_checkpoint(settings, _job("j2"), files.CKPT_LATEST, files.CKPT_BEST)
    assert found is not None and found.read_bytes() == b"only a best"


def test_a_serving_onnx_older_than_its_checkpoint_is_not_fetched(settings: Settings, tmp_path: Path) -> None:
    store = _store(settings)
    _put(store, tmp_path, "j3", f"{RUN_1}/ckpt_best.serving.onnx", b"of an older checkpoint")
    time.sleep(1.1)
    _put(store, tmp_path, "j3", f"{RUN_1}/ckpt_best.pth", b"retrained")
    best = stored.local_checkpoint(settings, _job("j3"), files.CKPT_BEST)
    assert best is not None and best.read_bytes() == b"retrained"
    assert not best.with_name("ckpt_best.serving.onnx").exists()


def test_a_local_store_reads_the_job_directory(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "j1"
    (job_dir / RUN_1).mkdir(parents=True)
    (job_dir / RUN_1 / "ckpt_best.pth").write_bytes(b"best")
    job = _job()
    job.job_dir, job.artifacts = str(job_dir), None
    settings = Settings(home=tmp_path / "home")
    assert (
        stored.local_checkpoint(settings, job, files.CKPT_BEST)
        == (job_dir / RUN_1 / "ckpt_best.pth").resolve()
    )
    assert stored.has_checkpoint(settings, job, files.CKPT_LATEST, files.CKPT_BEST)
    assert not stored.has_checkpoint(settings, job, files.CKPT_LATEST)
