"""`app.jobs.files` on hand-made job directories: checkpoint lookup, containment, artifact collection.

No service, no training: fake checkpoint files in SG's layout (`checkpoints/train/RUN_*/`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.auth.principal import DEFAULT_TENANT
from app.jobs import files
from app.jobs.models import Job, JobStatus


def _write(path: Path, data: bytes = b"x", mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _run(job_dir: Path, name: str) -> Path:
    return job_dir / "checkpoints" / "train" / name


def _job(
    job_dir: Path | None, artifacts: dict[str, str] | None = None, status: str = JobStatus.running
) -> Job:
    return Job(
        id="j1",
        tenant=DEFAULT_TENANT,
        status=status,
        model="yolo_nas_s",
        spec={},
        max_epochs=2,
        best_metric_name="mAP@0.50",
        job_dir=str(job_dir) if job_dir is not None else None,
        artifacts=artifacts,
    )


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A job directory with two runs: the newer run has a best and a latest checkpoint."""
    root = tmp_path / "jobs" / "j1"
    _write(_run(root, "RUN_1") / files.BEST_CHECKPOINT, b"old best", mtime=1_000)
    _write(_run(root, "RUN_1") / files.LATEST_CHECKPOINT, b"old latest", mtime=1_000)
    _write(_run(root, "RUN_2") / files.BEST_CHECKPOINT, b"new best", mtime=2_000)
    _write(_run(root, "RUN_2") / files.LATEST_CHECKPOINT, b"new latest", mtime=2_000)
    _write(_run(root, "RUN_2") / "events.out.tfevents.1.host", mtime=2_000)
    _write(_run(root, "RUN_2") / files.AVERAGING_SNAPSHOTS, b"ten models")
    _write(root / files.CONSOLE_LOG, b"log")
    _write(root / files.DATASET_DIR / "train.json", b"{}")
    return root


def test_layout_paths(tmp_path: Path) -> None:
    assert files.console_log(tmp_path) == tmp_path / "console.log"
    assert files.result_file(tmp_path) == tmp_path / "result.json"
    assert files.dataset_dir(tmp_path) == tmp_path / "dataset"
    assert files.sg_log_dir(tmp_path) == tmp_path / "logs"
    assert files.export_file(tmp_path) == tmp_path / "export" / "model.onnx"
    assert files.CHECKPOINTS == {
        "ckpt_best": "ckpt_best.pth",
        "ckpt_latest": "ckpt_latest.pth",
        "average_model": "average_model.pth",
    }


def test_running_job_uses_the_newest_checkpoint_on_disk(job_dir: Path) -> None:
    job = _job(job_dir)
    assert files.best_checkpoint(job) == _run(job_dir, "RUN_2").resolve() / files.BEST_CHECKPOINT
    assert files.init_checkpoint(job) == files.best_checkpoint(job)


def test_recorded_checkpoint_comes_first(job_dir: Path) -> None:
    recorded = _run(job_dir, "RUN_1") / files.BEST_CHECKPOINT
    job = _job(job_dir, {"ckpt_best": str(recorded)}, status=JobStatus.succeeded)
    assert files.best_checkpoint(job) == recorded.resolve()


def test_recorded_checkpoint_that_is_gone_falls_back_to_disk(job_dir: Path) -> None:
    job = _job(job_dir, {"ckpt_best": str(job_dir / "gone.pth")}, status=JobStatus.succeeded)
    assert files.best_checkpoint(job) == _run(job_dir, "RUN_2").resolve() / files.BEST_CHECKPOINT


def test_init_checkpoint_is_the_best_else_the_latest(job_dir: Path) -> None:
    for best in job_dir.rglob(files.BEST_CHECKPOINT):
        best.unlink()
    job = _job(job_dir)
    assert files.best_checkpoint(job) is None
    assert files.init_checkpoint(job) == _run(job_dir, "RUN_2").resolve() / files.LATEST_CHECKPOINT


def test_no_checkpoint_without_a_job_directory(tmp_path: Path) -> None:
    assert files.best_checkpoint(_job(None)) is None
    assert files.init_checkpoint(_job(tmp_path / "never-ran")) is None
    assert files.list_files(_job(None)) == {}


def test_a_recorded_path_outside_the_job_directory_is_refused(job_dir: Path, tmp_path: Path) -> None:
    outside = _write(tmp_path / "elsewhere" / files.BEST_CHECKPOINT)
    for best in job_dir.rglob(files.BEST_CHECKPOINT):
        best.unlink()
    job = _job(job_dir, {"ckpt_best": str(outside), "console_log": str(outside)})
    assert files.best_checkpoint(job) is None
    assert "elsewhere" not in str(files.list_files(job))


def test_a_symlink_that_leads_out_is_refused(job_dir: Path, tmp_path: Path) -> None:
    secret = _write(tmp_path / "secret" / "ckpt_best.pth", b"not the job's", mtime=9_000)
    for best in job_dir.rglob(files.BEST_CHECKPOINT):
        best.unlink()
    link = _run(job_dir, "RUN_3") / files.BEST_CHECKPOINT
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    # Neither found on disk nor accepted when recorded...
    assert files.best_checkpoint(_job(job_dir)) is None
    assert files.best_checkpoint(_job(job_dir, {"ckpt_best": str(link)})) is None
    # ...nor recorded by the worker, nor listed, nor served.
    assert "ckpt_best" not in files.collect_artifacts(job_dir)
    listed = files.list_files(_job(job_dir))
    assert all(f.path.is_relative_to(job_dir.resolve()) for f in listed.values())
    assert files.find_file(_job(job_dir), "checkpoints/train/RUN_3/ckpt_best.pth") is None
    # A link to a folder outside is not followed when looking for checkpoints either.
    (job_dir / "checkpoints" / "escape").symlink_to(secret.parent, target_is_directory=True)
    assert files.best_checkpoint(_job(job_dir)) is None


def test_a_symlink_inside_the_job_directory_is_fine(job_dir: Path) -> None:
    target = _run(job_dir, "RUN_2") / files.BEST_CHECKPOINT
    link = job_dir / "best-link.pth"
    link.symlink_to(target)
    job = _job(job_dir, {"ckpt_best": str(link)}, status=JobStatus.succeeded)
    assert files.best_checkpoint(job) == target.resolve()


def test_collect_artifacts_records_the_newest_files(job_dir: Path) -> None:
    assert files.collect_artifacts(job_dir) == {
        "console_log": str(job_dir / "console.log"),
        "ckpt_best": str(_run(job_dir, "RUN_2") / files.BEST_CHECKPOINT),
        "ckpt_latest": str(_run(job_dir, "RUN_2") / files.LATEST_CHECKPOINT),
        "tensorboard_dir": str(_run(job_dir, "RUN_2")),
    }
    _write(_run(job_dir, "RUN_2") / files.AVERAGE_MODEL)
    assert files.collect_artifacts(job_dir)["average_model"] == str(
        _run(job_dir, "RUN_2") / "average_model.pth"
    )
    assert files.collect_artifacts(job_dir / "nothing") == {}


def test_remove_training_scratch_keeps_the_checkpoints(job_dir: Path) -> None:
    files.remove_training_scratch(job_dir)
    assert not list(job_dir.rglob(files.AVERAGING_SNAPSHOTS))
    assert len(list(job_dir.rglob("*.pth"))) == 4


def test_listing_while_running_and_after_recording(job_dir: Path) -> None:
    running = files.list_files(_job(job_dir))
    assert {name: f.kind for name, f in running.items()} == {
        "checkpoints/train/RUN_2/ckpt_best.pth": "ckpt_best",
        "checkpoints/train/RUN_2/ckpt_latest.pth": "ckpt_latest",
        "console.log": "console_log",
        "checkpoints/train/RUN_2/events.out.tfevents.1": "tensorboard",
    }
    # Once recorded, the recorded files are listed (here the older run's, to tell them apart).
    recorded = {
        "ckpt_best": str(_run(job_dir, "RUN_1") / files.BEST_CHECKPOINT),
        "ckpt_latest": str(_run(job_dir, "RUN_1") / files.LATEST_CHECKPOINT),
        "console_log": str(job_dir / "console.log"),
        "tensorboard_dir": str(_run(job_dir, "RUN_1")),
    }
    _write(files.export_file(job_dir), b"onnx")
    finished = files.list_files(_job(job_dir, recorded, status=JobStatus.succeeded))
    assert {name: f.kind for name, f in finished.items()} == {
        "checkpoints/train/RUN_1/ckpt_best.pth": "ckpt_best",
        "checkpoints/train/RUN_1/ckpt_latest.pth": "ckpt_latest",
        "console.log": "console_log",
        "export/model.onnx": "onnx",
    }
    found = files.find_file(_job(job_dir, recorded), "export/model.onnx")
    assert found is not None and found.path == files.export_file(job_dir).resolve()


@pytest.mark.parametrize(
    "name", ["../j1/console.log", "/etc/passwd", "dataset/train.json", "result.json", "checkpoints", ""]
)
def test_only_listed_names_are_found(job_dir: Path, name: str) -> None:
    _write(files.result_file(job_dir), b"{}")
    assert files.find_file(_job(job_dir), name) is None
