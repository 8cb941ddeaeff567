"""Fixtures for the training-backend tests: tiny shapes datasets, a recording reporter, isolation.

Training runs in a forked child process, as in production (one subprocess per job): importing
super_gradients replaces sys.stdout, forces the root logging config and sets a process-global
device, none of which may leak into the rest of the test session.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from app.datasets.demo import ShapesSpec, write_shapes_dataset
from app.ml.params import TrainingConfig, TrainingSpec
from app.ml.types import MetricPoint, SplitFiles

CLASSES_3 = ("circle", "square", "triangle")
CLASSES_2 = ("circle", "square")


@dataclass
class RecordingReporter:
    """Reporter that keeps everything; `stop_when(self)` decides should_stop(), `lease_when(self)`
    holds_lease() (True when unset). Set both to None before the reporter goes back through a pipe
    (lambdas do not pickle)."""

    stop_when: Callable[[RecordingReporter], bool] | None = None
    lease_when: Callable[[RecordingReporter], bool] | None = None
    points: list[MetricPoint] = field(default_factory=list)
    progress_calls: list[dict[str, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    flushes: int = 0
    checks: int = 0  # should_stop() calls: one per train and per validation batch
    stop_requested_at: int | None = None  # len(progress_calls) when should_stop first said True
    lease_checks: int = 0  # holds_lease() calls: one per file put in place (checkpoints, snapshots)
    lease_lost_at: int | None = None  # lease_checks when holds_lease first said False

    def metrics(self, points: list[MetricPoint]) -> None:
        self.points.extend(points)

    def progress(self, *, epoch: int, max_epochs: int, batch: int, batches_per_epoch: int) -> None:
        self.progress_calls.append(
            {"epoch": epoch, "max_epochs": max_epochs, "batch": batch, "batches_per_epoch": batches_per_epoch}
        )

    def event(self, message: str, *, level: str = "info") -> None:
        self.events.append(message)

    def should_stop(self) -> bool:
        self.checks += 1
        if self.stop_requested_at is None and self.stop_when is not None and self.stop_when(self):
            self.stop_requested_at = len(self.progress_calls)
        return self.stop_requested_at is not None

    def flush(self) -> None:
        self.flushes += 1

    def holds_lease(self) -> bool:
        self.lease_checks += 1
        if self.lease_lost_at is None and self.lease_when is not None and not self.lease_when(self):
            self.lease_lost_at = self.lease_checks
        return self.lease_lost_at is None

    def series(self, name: str) -> list[MetricPoint]:
        """Points named `name`, in the order reported."""
        return [p for p in self.points if p.name == name]


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # everything, KeyboardInterrupt included, goes back to the parent
        conn.send(("error", exc, traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = 600) -> Any:
    """Run `fn(*args)` in a forked child; return its result or re-raise its exception here."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(sender, fn, args))
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")
        message = receiver.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if message[0] == "error":
        exc, tb = message[1], message[2]
        raise exc from RuntimeError(f"in child process:\n{tb}")
    return message[1]


ROOT = Path(__file__).resolve().parents[2]


def run_fresh(script: str, *args: str, timeout: float = 300) -> Any:
    """Run `script` in a fresh interpreter (from the repository root, `args` as its argv) and return
    the JSON of its last line. For what super-gradients' import or its patches would change here:
    this pytest process may have imported it already."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_dataset(
    root: Path, classes: tuple[str, ...], train: int, valid: int, seed: int = 0
) -> tuple[SplitFiles, SplitFiles]:
    """Write a sanitized (ids 0..n-1) shapes dataset under `root`; return (train, valid) splits."""
    spec = ShapesSpec(
        classes=classes, splits=(("train", train), ("valid", valid)), roboflow_placeholder=False, seed=seed
    )
    write_shapes_dataset(root, spec)
    splits = tuple(
        SplitFiles(root / name, root / name / "_annotations.coco.json", count) for name, count in spec.splits
    )
    return splits[0], splits[1]


def make_config(
    job_dir: Path,
    splits: tuple[SplitFiles, SplitFiles],
    classes: tuple[str, ...],
    *,
    input_size: tuple[int, int] = (64, 64),
    init_checkpoint: Path | None = None,
    **params: Any,
) -> TrainingConfig:
    """A CPU config with small defaults (2 epochs, batch 8) overridable through `params`, which are
    validated as a job spec's `training` section is."""
    defaults: dict[str, Any] = {"max_epochs": 2, "batch_size": 8, "initial_lr": 1e-3, "seed": 0}
    return TrainingConfig(
        model="yolo_nas_s",
        job_dir=job_dir,
        class_names=classes,
        train=splits[0],
        val=splits[1],
        input_size=input_size,
        training=TrainingSpec(**{**defaults, **params}),
        init_checkpoint=init_checkpoint,
        device="cpu",
    )


@pytest.fixture(scope="session")
def shapes3(tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitFiles, SplitFiles]:
    """16 train / 8 valid images of 96-160 px, three classes."""
    return make_dataset(tmp_path_factory.mktemp("shapes3"), CLASSES_3, train=16, valid=8)


@pytest.fixture(scope="session")
def shapes2(tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitFiles, SplitFiles]:
    """8 train / 4 valid images, two classes."""
    return make_dataset(tmp_path_factory.mktemp("shapes2"), CLASSES_2, train=8, valid=4, seed=1)
