"""`worker.store_sync.JobSync`: which copy of a job's file wins between machines, on a real S3 server."""

from __future__ import annotations

import os
import time
from pathlib import Path

from app.jobs.files import job_key
from app.storage import S3Store
from app.testing import S3Server
from tests.storage.conftest import make_s3_store
from worker.store_sync import STATE_FILE, JobSync

JOB = "job1"
RUN = "checkpoints/train/RUN_1"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _stored(store: S3Store, relative: str) -> bytes:
    return b"".join(store.open_stream(job_key(JOB, relative)))


def test_push_uploads_what_changed_and_never_temporary_or_scratch_files(s3: S3Server, tmp_path: Path) -> None:
    store = make_s3_store(s3)
    job_dir = tmp_path / "machine-a" / JOB
    _write(job_dir / f"{RUN}/ckpt_latest.pth", b"epoch 1")
    _write(job_dir / f"{RUN}/ckpt_latest.pth.123-abcd.tmp", b"half")
    _write(job_dir / f"{RUN}/averaging_snapshots.pkl", b"scratch")
    _write(job_dir / f"{RUN}/ckpt_latest.previous.pth", b"fallback")
    _write(job_dir / "console.log", b"line 1\n")
    _write(job_dir / "dataset/train/a.jpg", b"not an artifact")
    sync = JobSync(store, job_dir, JOB)
    assert sorted(sync.push()) == sorted(
        [job_key(JOB, "console.log"), job_key(JOB, f"{RUN}/ckpt_latest.pth")]
    )
    assert sync.push() == []  # nothing changed
    assert {i.key for i in store.list(job_key(JOB))} == {
        job_key(JOB, "console.log"),
        job_key(JOB, f"{RUN}/ckpt_latest.pth"),
    }
    with open(job_dir / "console.log", "ab") as log:
        log.write(b"line 2\n")
    assert sync.push() == [job_key(JOB, "console.log")]
    assert _stored(store, "console.log") == b"line 1\nline 2\n"
    assert not [p for p in job_dir.rglob("*.upload.tmp")]  # snapshots are removed


def test_a_machine_resuming_takes_the_newer_checkpoint_another_machine_uploaded(
    s3: S3Server, tmp_path: Path
) -> None:
    store = make_s3_store(s3)
    a_dir, b_dir = tmp_path / "a" / JOB, tmp_path / "b" / JOB
    # Machine A trains epoch 1 and uploads it.
    _write(a_dir / f"{RUN}/ckpt_latest.pth", b"epoch 1")
    JobSync(store, a_dir, JOB).push()
    # Machine B, with an empty home, resumes: it downloads epoch 1, trains epoch 2 and uploads it.
    b = JobSync(store, b_dir, JOB)
    assert b.pull_checkpoints() == [job_key(JOB, f"{RUN}/ckpt_latest.pth")]
    assert (b_dir / f"{RUN}/ckpt_latest.pth").read_bytes() == b"epoch 1"
    assert b.pull_checkpoints() == []  # its own copy now
    time.sleep(0.01)
    _write(b_dir / f"{RUN}/ckpt_latest.pth", b"epoch 2")
    assert b.push() == [job_key(JOB, f"{RUN}/ckpt_latest.pth")]
    # Machine A gets the job back (a fresh process reads its record): B's newer file replaces its own.
    a = JobSync(store, a_dir, JOB)
    assert (a_dir / STATE_FILE).is_file()
    assert a.pull_checkpoints() == [job_key(JOB, f"{RUN}/ckpt_latest.pth")]
    assert (a_dir / f"{RUN}/ckpt_latest.pth").read_bytes() == b"epoch 2"


def test_a_checkpoint_written_here_after_the_last_upload_is_kept_and_uploaded(
    s3: S3Server, tmp_path: Path
) -> None:
    store = make_s3_store(s3)
    job_dir = tmp_path / "a" / JOB
    path = _write(job_dir / f"{RUN}/ckpt_latest.pth", b"epoch 1")
    JobSync(store, job_dir, JOB).push()
    # Epoch 2 reached the disk, then the process died before uploading it.
    path.write_bytes(b"epoch 2")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    restarted = JobSync(store, job_dir, JOB)
    assert restarted.pull_checkpoints() == []  # the store's copy is this machine's older one
    assert path.read_bytes() == b"epoch 2"
    assert restarted.push() == [job_key(JOB, f"{RUN}/ckpt_latest.pth")]
    assert _stored(store, f"{RUN}/ckpt_latest.pth") == b"epoch 2"
