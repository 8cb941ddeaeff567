"""Resume with SG's own machinery, and atomic, fenced checkpoints: real super-gradients on the CPU.

Everything that trains runs in one child process (the module fixture `lifecycle`; SG's import and
first training cost most of the time). It trains a 3-epoch job the way a job interrupted twice
lives: cancelled at epoch 1's first batch (A), resumed and cancelled at epoch 2's first batch (B),
resumed to the end (C), then trained further to 4 epochs (D). On hard-linked copies of the job
after A and after B (a copy is only ever changed by replacing whole files) it then resumes with a
full disk, with the lease lost, from an older checkpoint, and past a recorded best. The tests
assert on what the child recorded; the `pick_resume_checkpoint` tests run here, without training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.jobs import files
from app.ml.layout import TEMP_SUFFIX
from app.ml.params import TrainingConfig
from app.ml.types import DiskFull, LeaseLost, SplitFiles, TrainingCancelled
from tests.ml.conftest import CLASSES_3, RecordingReporter, make_config, make_dataset, run_isolated

pytestmark = pytest.mark.slow  # real super-gradients training on the CPU

MAP = "Valid_mAP@0.50"


def _stop_at_epoch(epoch: int) -> RecordingReporter:
    """A reporter whose should_stop() turns True at the first train batch of `epoch`."""
    return RecordingReporter(
        stop_when=lambda r: bool(r.progress_calls) and r.progress_calls[-1]["epoch"] == epoch
    )


def _train(config: TrainingConfig, reporter: RecordingReporter) -> dict[str, Any]:
    """Run training in this (child) process; the outcome and the reporter, ready to pickle back."""
    from app.ml.training import run_training

    result: Any = None
    try:
        result = run_training(config, reporter)
        outcome = "finished"
    except (TrainingCancelled, LeaseLost, DiskFull) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    reporter.stop_when = reporter.lease_when = None  # lambdas do not pickle back to the parent
    return {"outcome": outcome, "result": result, "reporter": reporter}


def _snapshot_epochs(job_dir: Path) -> list[int | None]:
    """The epoch count of each averaging snapshot slot (None: empty)."""
    import torch

    from app.ml.checkpoints import sg_safe_globals

    (path,) = job_dir.rglob(files.AVERAGING_SNAPSHOTS)
    with sg_safe_globals():
        snapshots = torch.load(path, weights_only=True)
    return [
        e if snapshots[f"snapshot{i}"] is not None else None
        for i, e in enumerate(snapshots["snapshots_epoch"])
    ]


def _copy_job(job_dir: Path, to: Path) -> Path:
    """A copy of the job directory made of hard links (cheap for ~1 GB of checkpoints)."""
    shutil.copytree(job_dir, to, copy_function=os.link)
    return to


def _lifecycle(config: TrainingConfig, copies: Path) -> dict[str, Any]:
    """Child process: attempts A (cancelled in epoch 1), B (resumed, cancelled in epoch 2), C (resumed
    to the end), D (trained further to max_epochs 4), with the resume points and copies between."""
    from app.ml.checkpoints import pick_resume_checkpoint

    out: dict[str, Any] = {"A": _train(config, _stop_at_epoch(1))}
    out["after_A"] = _copy_job(config.job_dir, copies / "after_A")
    out["point_B"] = pick_resume_checkpoint(config.job_dir)
    out["B"] = _train(dataclasses.replace(config, resume_from=out["point_B"].path), _stop_at_epoch(2))
    out["snapshots_B"] = _snapshot_epochs(config.job_dir)
    out["after_B"] = _copy_job(config.job_dir, copies / "after_B")
    out["point_C"] = pick_resume_checkpoint(config.job_dir)
    out["C"] = _train(dataclasses.replace(config, resume_from=out["point_C"].path), RecordingReporter())
    out["artifacts_C"] = files.collect_artifacts(config.job_dir)
    out["point_D"] = pick_resume_checkpoint(config.job_dir)
    further = dataclasses.replace(
        config,
        resume_from=out["point_D"].path,
        training=config.training.model_copy(update={"max_epochs": 4}),
    )
    out["D"] = _train(further, RecordingReporter())
    out["artifacts_D"] = files.collect_artifacts(config.job_dir)
    # E: resumed once more with nothing left to train (as after a kill past the last checkpoint).
    out["E"] = _train(
        dataclasses.replace(further, resume_from=pick_resume_checkpoint(config.job_dir).path),
        RecordingReporter(),
    )

    scenarios: dict[str, Any] = {
        "disk_full": (_resume_with_failpoint, "after_A"),
        "lease_lost": (_resume_losing_lease, "after_A"),
        "beats_recorded_best": (_resume_beats_recorded_best, "after_A"),
        "from_previous": (_resume_from_previous, "after_B"),
        "damaged_snapshots": (_resume_with_damaged_snapshots, "after_A"),
    }
    for name, (scenario, start) in scenarios.items():
        job_dir = _copy_job(out[start], copies / name)
        try:
            out[name] = scenario(dataclasses.replace(config, job_dir=job_dir))
        except Exception:  # one broken scenario must not hide the others' results
            out[name] = {"error": traceback.format_exc()}
    return out


def _scenario(lifecycle: dict[str, Any], name: str) -> dict[str, Any]:
    out = lifecycle[name]
    assert "error" not in out, out["error"]
    return dict(out)


@pytest.fixture(scope="module")
def shapes_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitFiles, SplitFiles]:
    """8 train / 4 valid images, three classes: 2 batches of 4 per epoch."""
    return make_dataset(tmp_path_factory.mktemp("shapes-small"), CLASSES_3, train=8, valid=4, seed=2)


@pytest.fixture(scope="module")
def lifecycle(
    tmp_path_factory: pytest.TempPathFactory, shapes_small: tuple[SplitFiles, SplitFiles]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("resume")
    config = make_config(root / "job", shapes_small, CLASSES_3, max_epochs=3, batch_size=4)
    yield run_isolated(_lifecycle, config, root) | {"config": config}
    shutil.rmtree(root, ignore_errors=True)  # a few GB of checkpoints


def _timeline(*attempts: dict[str, Any]) -> dict[int, float]:
    """The watched metric by epoch as a caller keeps it: later attempts supersede earlier epochs."""
    values: dict[int, float] = {}
    for attempt in attempts:
        for point in attempt["reporter"].series(MAP):
            assert point.epoch is not None
            values[point.epoch] = point.value
    return values


def _load(path: Path) -> dict[str, Any]:
    from app.ml.checkpoints import load_checkpoint

    return load_checkpoint(path)


def test_each_attempt_trains_only_the_epochs_after_its_checkpoint(lifecycle: dict[str, Any]) -> None:
    a, b, c, d = (lifecycle[k] for k in "ABCD")
    assert a["outcome"] == "TrainingCancelled: training cancelled during epoch 1 train batch 0"
    assert b["outcome"] == "TrainingCancelled: training cancelled during epoch 2 train batch 0"
    assert c["outcome"] == d["outcome"] == "finished"
    # ckpt["epoch"] counts the epochs completed, which is the 0-based index of the next epoch.
    assert [lifecycle[f"point_{k}"].next_epoch for k in "BCD"] == [1, 2, 3]
    assert [p.epoch for p in a["reporter"].series(MAP)] == [0]
    assert [p.epoch for p in b["reporter"].series(MAP)] == [1]
    assert [p.epoch for p in c["reporter"].series(MAP)] == [2]
    assert [p.epoch for p in d["reporter"].series(MAP)] == [3]
    # Per-batch steps go on where they stopped (2 batches per epoch).
    assert [p.step for p in b["reporter"].series("Batch_LR")] == [2, 3, 4]
    assert [p.step for p in c["reporter"].series("Batch_LR")] == [4, 5]
    assert [p.step for p in d["reporter"].series("Batch_LR")] == [6, 7]
    assert c["result"].epochs_completed == 3
    assert d["result"].epochs_completed == 4
    assert d["reporter"].progress_calls[-1] == {
        "epoch": 3,
        "max_epochs": 4,
        "batch": 2,
        "batches_per_epoch": 2,
    }
    assert _load(Path(lifecycle["artifacts_D"]["ckpt_latest"]))["epoch"] == 4
    e = lifecycle["E"]
    assert e["outcome"] == "finished" and e["result"].epochs_completed == 4
    assert not e["reporter"].series("Batch_LR") and not e["reporter"].series(MAP)
    assert e["reporter"].series("mAP@0.50"), "SG still validates the averaged model"


def test_learning_rate_continues_the_schedule(lifecycle: dict[str, Any]) -> None:
    lr = {k: [(p.step, p.value) for p in lifecycle[k]["reporter"].series("Batch_LR")] for k in "ABC"}
    warmup = lifecycle["config"].training.warmup_initial_lr
    assert lr["A"][0] == (0, warmup)  # epoch 0 is the warm-up epoch
    # Each cancelled attempt reported the first batch of the epoch the next one starts with: the
    # resumed LR is that value (no second warm-up, no restarted cosine).
    assert lr["B"][0] == lr["A"][-1]
    assert lr["C"][0] == lr["B"][-1]
    assert all(value > warmup for _, value in lr["B"] + lr["C"])
    assert [v for _, v in lr["B"] + lr["C"][1:]] == sorted(
        (v for _, v in lr["B"] + lr["C"][1:]), reverse=True
    )


def test_best_checkpoint_and_best_value_over_all_attempts(lifecycle: dict[str, Any]) -> None:
    values = _timeline(lifecycle["A"], lifecycle["B"], lifecycle["C"])
    assert sorted(values) == [0, 1, 2]
    best = max(values.values())
    first_best_epoch = min(e for e, v in values.items() if v == best)
    assert lifecycle["C"]["result"].best_metric_value == pytest.approx(best)
    assert lifecycle["point_C"].best_value == pytest.approx(max(values[0], values[1]))
    ckpt_best = _load(Path(lifecycle["artifacts_C"]["ckpt_best"]))
    # SG rewrites ckpt_best.pth only on a strictly better value: the first epoch with the best.
    assert ckpt_best["epoch"] == first_best_epoch + 1
    assert ckpt_best["acc"] == pytest.approx(best)


def test_averaging_snapshots_continue_across_a_resume(lifecycle: dict[str, Any]) -> None:
    # A's epoch-0 snapshot (count 1) was kept by B, which added its epoch 1 (count 2).
    assert lifecycle["snapshots_B"][:2] == [1, 2]
    assert lifecycle["snapshots_B"][2:] == [None] * 8
    # Finished runs delete it; D's average covers its own epoch only (C's snapshots are gone).
    assert not list(lifecycle["config"].job_dir.rglob(files.AVERAGING_SNAPSHOTS))
    assert "average_model" in lifecycle["artifacts_D"]


def test_one_run_directory_and_artifacts(lifecycle: dict[str, Any]) -> None:
    job_dir: Path = lifecycle["config"].job_dir
    (run_dir,) = (job_dir / "checkpoints" / "train").iterdir()
    assert sorted(p.name for p in run_dir.glob("*.pth")) == [
        "average_model.pth",
        "ckpt_best.pth",
        "ckpt_latest.previous.pth",
        "ckpt_latest.pth",
    ]
    assert not [p for p in job_dir.rglob("*") if files.is_temp_file(p)]
    assert {
        kind: Path(p).name for kind, p in lifecycle["artifacts_D"].items() if kind in files.CHECKPOINTS
    } == {
        "ckpt_best": "ckpt_best.pth",
        "ckpt_latest": "ckpt_latest.pth",
        "average_model": "average_model.pth",
    }
    assert _load(run_dir / files.PREVIOUS_LATEST_CHECKPOINT)["epoch"] == 3


# --- picking the checkpoint to resume from (no training) ------------------------------------------


def _truncate(path: Path) -> None:
    """Replace `path` by its first half (a new file: the hard-linked original stays whole)."""
    data = path.read_bytes()
    half = path.with_name(path.name + ".half")
    half.write_bytes(data[: len(data) // 2])
    os.replace(half, path)


@pytest.fixture
def after_b(lifecycle: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the job after attempt B: latest = 2 epochs, previous and best = 1."""
    return _copy_job(lifecycle["after_B"], tmp_path / "job")


def _run_dir(job_dir: Path) -> Path:
    (run_dir,) = (job_dir / "checkpoints" / "train").iterdir()
    return run_dir


def test_pick_takes_the_newest_epoch(after_b: Path) -> None:
    from app.ml.checkpoints import pick_resume_checkpoint

    point = pick_resume_checkpoint(after_b)
    assert point is not None
    assert (point.path.name, point.next_epoch, point.skipped) == ("ckpt_latest.pth", 2, [])
    assert point.metric == "mAP@0.50"


def test_pick_skips_a_truncated_latest_for_the_previous_then_the_best(after_b: Path) -> None:
    from app.ml.checkpoints import pick_resume_checkpoint

    run_dir = _run_dir(after_b)
    rel = run_dir.relative_to(after_b).as_posix()
    _truncate(run_dir / files.LATEST_CHECKPOINT)
    # A stale temporary file of a killed writer is never a candidate.
    (run_dir / f"{files.LATEST_CHECKPOINT}.1234-abcd{TEMP_SUFFIX}").write_bytes(b"partial")
    point = pick_resume_checkpoint(after_b)
    assert point is not None
    assert (point.path.name, point.next_epoch) == (files.PREVIOUS_LATEST_CHECKPOINT, 1)
    (skipped,) = point.skipped
    assert skipped.startswith(f"{rel}/ckpt_latest.pth: RuntimeError: PytorchStreamReader failed")

    _truncate(run_dir / files.PREVIOUS_LATEST_CHECKPOINT)
    point = pick_resume_checkpoint(after_b)
    assert point is not None
    assert (point.path.name, point.next_epoch) == (files.BEST_CHECKPOINT, 1)
    assert [s.split(":")[0] for s in point.skipped] == [
        f"{rel}/ckpt_latest.pth",
        f"{rel}/ckpt_latest.previous.pth",
    ]
    _truncate(run_dir / files.BEST_CHECKPOINT)
    assert pick_resume_checkpoint(after_b) is None
    assert pick_resume_checkpoint(after_b / "nothing") is None


def test_lookups_ignore_temporary_files_and_the_previous_checkpoint(after_b: Path) -> None:
    run_dir = _run_dir(after_b)
    temp = run_dir / f"{files.BEST_CHECKPOINT}.99-beef{TEMP_SUFFIX}"
    temp.write_bytes(b"partial")
    os.utime(temp, (4_000_000_000, 4_000_000_000))  # newer than everything
    artifacts = files.collect_artifacts(after_b)
    assert Path(artifacts["ckpt_latest"]).name == files.LATEST_CHECKPOINT
    assert Path(artifacts["ckpt_best"]).name == files.BEST_CHECKPOINT
    assert not [p for p in artifacts.values() if "previous" in p or p.endswith(TEMP_SUFFIX)]
    assert files.resume_candidates(after_b) == [
        run_dir / files.LATEST_CHECKPOINT,
        run_dir / files.PREVIOUS_LATEST_CHECKPOINT,
        run_dir / files.BEST_CHECKPOINT,
    ]


# --- resumes that must keep what is on disk ---------------------------------------------------------


def _resume_from_previous(config: TrainingConfig) -> dict[str, Any]:
    """Resume from the kept previous checkpoint (1 epoch) of a job whose latest (2 epochs) is
    truncated; stop at the first batch, once the averaging has been set up."""
    from app.ml.checkpoints import pick_resume_checkpoint

    _truncate(_run_dir(config.job_dir) / files.LATEST_CHECKPOINT)
    point = pick_resume_checkpoint(config.job_dir)
    assert point is not None
    out = _train(dataclasses.replace(config, resume_from=point.path), _stop_at_epoch(1))
    return out | {"point": point, "snapshots": _snapshot_epochs(config.job_dir)}


def test_resume_from_an_older_checkpoint_drops_superseded_snapshots(lifecycle: dict[str, Any]) -> None:
    out = _scenario(lifecycle, "from_previous")
    assert (out["point"].path.name, out["point"].next_epoch) == (files.PREVIOUS_LATEST_CHECKPOINT, 1)
    assert out["outcome"] == "TrainingCancelled: training cancelled during epoch 1 train batch 0"
    # B's epoch-1 snapshot (count 2) belongs to the epoch this attempt trains again.
    assert out["snapshots"] == [1] + [None] * 9


def _resume_and_look(config: TrainingConfig, reporter: RecordingReporter) -> dict[str, Any]:
    """Resume the job from its newest checkpoint; then what is on disk (ckpt_latest.pth's epoch and
    identity, the run directory's names) next to the outcome."""
    from app.ml.checkpoints import pick_resume_checkpoint

    point = pick_resume_checkpoint(config.job_dir)
    assert point is not None
    latest = point.path.with_name(files.LATEST_CHECKPOINT)
    before = (latest.stat().st_ino, latest.stat().st_mtime_ns)
    out = _train(dataclasses.replace(config, resume_from=point.path), reporter)
    return out | {
        "latest_epoch": _load(latest)["epoch"],
        "latest_unchanged": (latest.stat().st_ino, latest.stat().st_mtime_ns) == before,
        "names": sorted(p.name for p in latest.parent.iterdir()),
    }


def _resume_with_failpoint(config: TrainingConfig) -> dict[str, Any]:
    """Resume with the disk full in the middle of the checkpoints of 2 epochs (epoch index 1)."""
    import app.failpoints

    os.environ[app.failpoints.ENV_VAR] = json.dumps({"checkpoint_write": {"action": "enospc", "epoch": 2}})
    app.failpoints.reset()
    try:
        return _resume_and_look(config, RecordingReporter())
    finally:
        del os.environ[app.failpoints.ENV_VAR]
        app.failpoints.reset()


def test_disk_full_while_writing_keeps_the_previous_checkpoint(lifecycle: dict[str, Any]) -> None:
    out = _scenario(lifecycle, "disk_full")
    assert out["outcome"].startswith("DiskFull: no space left to write ckpt_latest.pth in ")
    assert "MiB free" in out["outcome"] and "the previous ckpt_latest.pth is intact" in out["outcome"]
    assert out["latest_epoch"] == 1 and out["latest_unchanged"]
    assert not [n for n in out["names"] if n.endswith(TEMP_SUFFIX)]
    assert files.PREVIOUS_LATEST_CHECKPOINT not in out["names"]
    assert [p.epoch for p in out["reporter"].series(MAP)] == [1]  # validated, not saved


def _resume_losing_lease(config: TrainingConfig) -> dict[str, Any]:
    """Resume with holds_lease() False from its first call on."""
    return _resume_and_look(config, RecordingReporter(lease_when=lambda r: False))


def test_lost_lease_replaces_nothing(lifecycle: dict[str, Any]) -> None:
    out = _scenario(lifecycle, "lease_lost")
    assert out["outcome"] == "LeaseLost: this attempt lost the job's lease: ckpt_latest.pth not replaced"
    assert out["reporter"].lease_lost_at == 1  # the first file it would have put in place
    assert out["latest_epoch"] == 1 and out["latest_unchanged"]
    assert not [n for n in out["names"] if n.endswith(TEMP_SUFFIX)]
    assert files.PREVIOUS_LATEST_CHECKPOINT not in out["names"]


def _resume_beats_recorded_best(config: TrainingConfig) -> dict[str, Any]:
    """The checkpoint records a best mAP (-1) that the next epoch's (>= 0) beats; max_epochs 2."""
    import torch

    from app.ml.checkpoints import load_checkpoint, pick_resume_checkpoint

    latest = _run_dir(config.job_dir) / files.LATEST_CHECKPOINT
    # Both record -1 (ckpt_best.pth's 0.0 would otherwise be the best so far; deleting it instead
    # would make the resume validate the model first, as when the best epoch's file was lost).
    for path in (latest, latest.with_name(files.BEST_CHECKPOINT)):
        ckpt = load_checkpoint(path)
        ckpt["acc"] = -1.0
        ckpt["metrics"]["valid"]["mAP@0.50"] = -1.0
        torch.save(ckpt, path.with_name("edited.pth"))
        os.replace(path.with_name("edited.pth"), path)
    point = pick_resume_checkpoint(config.job_dir)
    assert point is not None
    two_epochs = config.training.model_copy(update={"max_epochs": 2})
    out = _train(
        dataclasses.replace(config, resume_from=point.path, training=two_epochs), RecordingReporter()
    )
    best = latest.parent / files.BEST_CHECKPOINT
    return out | {"point": point, "best_epoch": _load(best)["epoch"] if best.exists() else None}


def test_best_checkpoint_updates_after_resume_for_a_higher_is_better_metric(
    lifecycle: dict[str, Any],
) -> None:
    out = _scenario(lifecycle, "beats_recorded_best")
    assert out["point"].best_value == -1.0
    assert out["outcome"] == "finished"
    # SG 3.7.1 alone keeps best_metric at +inf after a resume and never writes ckpt_best.pth again.
    assert out["best_epoch"] == 2
    (value,) = [p.value for p in out["reporter"].series(MAP)]
    assert out["result"].best_metric_value == pytest.approx(value)


def _resume_with_damaged_snapshots(config: TrainingConfig) -> dict[str, Any]:
    """Resume after the averaging snapshots were cut short (as SG's in-place write leaves them when
    killed); stop at the first batch, once the averaging has been set up."""
    from app.ml.checkpoints import pick_resume_checkpoint

    _truncate(_run_dir(config.job_dir) / files.AVERAGING_SNAPSHOTS)
    point = pick_resume_checkpoint(config.job_dir)
    assert point is not None
    out = _train(dataclasses.replace(config, resume_from=point.path), _stop_at_epoch(1))
    return out | {"snapshots": _snapshot_epochs(config.job_dir)}


def test_damaged_averaging_snapshots_start_over(lifecycle: dict[str, Any]) -> None:
    out = _scenario(lifecycle, "damaged_snapshots")
    assert out["outcome"] == "TrainingCancelled: training cancelled during epoch 1 train batch 0"
    assert out["snapshots"] == [None] * 10
    assert any("averaging_snapshots.pkl unreadable" in e for e in out["reporter"].events)
