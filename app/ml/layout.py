"""Where super-gradients writes a run's files in a job directory, and the names of those files.

    <job_dir>/checkpoints/train/RUN_*/   ckpt_best.pth, ckpt_latest.pth (and the previous one kept
                                         until the next is in place), average_model.pth,
                                         averaging_snapshots.pkl while training, TensorBoard files,
                                         <checkpoint stem>.serving.onnx once exported for serving

Standard library only: the training code writes these files and `app.jobs.files` (the service)
reads them, and app.ml may not import app.jobs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from app.ml.types import CHECKPOINTS_DIR
from app.paths import is_inside

EXPERIMENT_NAME = "train"

# The files of a run directory; SG chooses the first five names.
BEST_CHECKPOINT = "ckpt_best.pth"
LATEST_CHECKPOINT = "ckpt_latest.pth"
AVERAGE_MODEL = "average_model.pth"
AVERAGING_SNAPSHOTS = "averaging_snapshots.pkl"
TENSORBOARD_PATTERN = "events.out.tfevents.*"
# The ckpt_latest.pth that the newest one replaced: the fallback when the newest does not load.
PREVIOUS_LATEST_CHECKPOINT = "ckpt_latest.previous.pth"
# The serving ONNX file of a checkpoint (`app.ml.export.export_for_serving`), next to it:
# `ckpt_best.pth` -> `ckpt_best.serving.onnx`. The inference engine serves it with onnxruntime.
SERVING_ONNX_SUFFIX = ".serving.onnx"
# Files being written (`<name>.<pid>-<token>.tmp`); never a checkpoint, never an artifact.
TEMP_SUFFIX = ".tmp"
# The files a resume may start from, most preferred first among those of the same epoch.
RESUME_NAMES = (LATEST_CHECKPOINT, PREVIOUS_LATEST_CHECKPOINT, BEST_CHECKPOINT)


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to `path`, for writing it and then renaming it into place.

    Unique per process and call, so a stale process and the attempt that took over never write the
    same temporary file.
    """
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_file(path: Path) -> bool:
    """True for a temporary file of `temp_path` (possibly left behind by a killed process)."""
    return path.name.endswith(TEMP_SUFFIX)


def serving_onnx_path(checkpoint: Path) -> Path:
    """Where the serving ONNX file of `checkpoint` is written and looked for."""
    return checkpoint.with_name(checkpoint.stem + SERVING_ONNX_SUFFIX)


def run_dirs(job_dir: Path) -> list[Path]:
    """The job's SG run directories (`checkpoints/train/RUN_*`) inside the job directory."""
    experiment = job_dir / CHECKPOINTS_DIR / EXPERIMENT_NAME
    if not experiment.is_dir():
        return []
    return sorted(p for p in experiment.glob("RUN_*") if p.is_dir() and is_inside(p, job_dir))


def resume_candidates(job_dir: Path) -> list[Path]:
    """Every checkpoint of the job a resume may start from: ckpt_latest.pth, the kept previous one
    and ckpt_best.pth of each run directory; newest run directory first, then in `RESUME_NAMES`
    order. Only files inside the job directory; whether they load is not checked here."""
    found = []
    for run_dir in reversed(run_dirs(job_dir)):
        for name in RESUME_NAMES:
            path = run_dir / name
            if path.is_file() and is_inside(path, job_dir):
                found.append(path)
    return found
