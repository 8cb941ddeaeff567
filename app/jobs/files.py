"""A job's directory: where each of its files is, which checkpoint to use, and which files may be served.

    <jobs_dir>/<job id>/
        console.log              the training process's output (stdout and stderr)
        result.json              how the training process ended, for its supervisor to record
        dataset/                 the validated, sanitized copy of the dataset the training reads
        logs/                    super-gradients' own logs (SUPER_GRADIENTS_LOG_DIR)
        checkpoints/train/RUN_*/ SG's run: ckpt_best.pth, ckpt_latest.pth, average_model.pth,
                                 TensorBoard event files (and averaging_snapshots.pkl while it trains);
                                 ckpt_latest.previous.pth, the latest checkpoint before the newest (a
                                 resume's fallback, never an artifact); *.tmp files being written
        export/model.onnx        the ONNX export of the best checkpoint

Every path this module hands out for a job lies inside the job's directory after following
symlinks (`app.paths.is_inside`): a recorded path or a link that leads elsewhere is ignored.
Temporary files are never a checkpoint or an artifact. Only the standard library, `app.paths`,
`app.ml.types` and `app.ml.layout` (the run directory's file names, defined where the training
backend, which may not import this module, can use them) are imported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

# `X as X` re-exports them for the service.
from app.ml.layout import (
    AVERAGE_MODEL,
    AVERAGING_SNAPSHOTS,
    BEST_CHECKPOINT,
    LATEST_CHECKPOINT,
    TEMP_SUFFIX,
    TENSORBOARD_PATTERN,
    is_temp_file,
)
from app.ml.layout import PREVIOUS_LATEST_CHECKPOINT as PREVIOUS_LATEST_CHECKPOINT
from app.ml.layout import resume_candidates as resume_candidates
from app.ml.types import CHECKPOINTS_DIR, SG_LOG_DIR
from app.paths import is_inside, real

if TYPE_CHECKING:
    from app.jobs.models import Job

CONSOLE_LOG = "console.log"
RESULT_FILE = "result.json"
DATASET_DIR = "dataset"
EXPORT_NAME = "export/model.onnx"
# An export with options other than the defaults: `export/model-<variant>.onnx` (`export_file`).
EXPORT_VARIANTS = "export/model-*.onnx"

# Artifact keys (recorded on the job when it ends, and the kinds the API lists) of the checkpoints.
CKPT_BEST = "ckpt_best"
CKPT_LATEST = "ckpt_latest"
AVERAGE = "average_model"
CHECKPOINTS: dict[str, str] = {
    CKPT_BEST: BEST_CHECKPOINT,
    CKPT_LATEST: LATEST_CHECKPOINT,
    AVERAGE: AVERAGE_MODEL,
}
# The other recorded keys, and the listed kinds that are not recorded keys.
CONSOLE_LOG_KEY = "console_log"
TENSORBOARD_DIR_KEY = "tensorboard_dir"
TENSORBOARD_KIND = "tensorboard"
ONNX_KIND = "onnx"


# A job's folder in the store (`SGJOBS_STORAGE_URL`): `jobs/<job id>/<path in the job directory>`.
# With the default local store this is the job directory itself (`<home>/jobs/<id>`).
JOBS_PREFIX = "jobs"


def job_key(job_id: str, relative: str = "") -> str:
    """The store key of the file at `relative` (POSIX) in the job's directory; "" for its folder."""
    prefix = f"{JOBS_PREFIX}/{job_id}"
    return f"{prefix}/{relative}" if relative else prefix


# Never uploaded to a remote store: SG's averaging scratch (ten model copies, rewritten every epoch;
# a resume elsewhere starts the averaging over) and the local fallback of a torn write (an object in
# the store is whole or absent).
_NOT_STORED = (AVERAGING_SNAPSHOTS, PREVIOUS_LATEST_CHECKPOINT)


def files_to_store(job_dir: Path) -> list[Path]:
    """The files of the job directory a worker uploads to a remote store: the checkpoints, TensorBoard
    files and serving exports under `checkpoints/`, the console log and `export/`; no temporary file."""
    found = [console_log(job_dir)] if console_log(job_dir).is_file() else []
    for folder in (job_dir / CHECKPOINTS_DIR, job_dir / EXPORT_NAME.split("/")[0]):
        found.extend(
            p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not is_temp_file(p) and p.name not in _NOT_STORED and is_inside(p, job_dir)
        )
    return found


def console_log(job_dir: Path) -> Path:
    """Where the training process's output goes."""
    return job_dir / CONSOLE_LOG


def result_file(job_dir: Path) -> Path:
    """Where the training process writes how it ended."""
    return job_dir / RESULT_FILE


def dataset_dir(job_dir: Path) -> Path:
    """Where the training process puts the prepared dataset."""
    return job_dir / DATASET_DIR


def sg_log_dir(job_dir: Path) -> Path:
    """super-gradients' log folder (SUPER_GRADIENTS_LOG_DIR) of the training process."""
    return job_dir / SG_LOG_DIR


def export_file(job_dir: Path, variant: str = "") -> Path:
    """Where the ONNX export is written; `variant` names the options of a non-default one."""
    return job_dir / export_name(variant)


def export_name(variant: str = "") -> str:
    """The artifact name of the ONNX export with options `variant` ("" for the defaults)."""
    return EXPORT_NAME.removesuffix(".onnx") + f"-{variant}.onnx" if variant else EXPORT_NAME


def is_event_file(name: str) -> bool:
    """True for a TensorBoard event file's name (never a temporary file)."""
    return fnmatchcase(name, TENSORBOARD_PATTERN) and not name.endswith(TEMP_SUFFIX)


def is_export(relative: str) -> bool:
    """True for the relative path of an ONNX export of the job: `export/model.onnx`, or
    `export/model-<variant>.onnx` (`export_name`) directly in the export folder."""
    if relative == EXPORT_NAME:
        return True
    folder, _, name = relative.rpartition("/")
    return folder == EXPORT_VARIANTS.rpartition("/")[0] and fnmatchcase(
        name, EXPORT_VARIANTS.rpartition("/")[2]
    )


def stored_kind(relative: str) -> str | None:
    """What a file at `relative` (POSIX, in the job directory) is as an artifact, by its path alone:
    a checkpoint key of CHECKPOINTS (such a file under the checkpoints folder), `console_log`,
    `tensorboard` (an event file under the checkpoints folder) or `onnx` (`is_export`); None for
    anything else (temporary files, `ckpt_latest.previous.pth`, serving ONNX files, the dataset).
    The same rules `list_files` applies to a job directory, for a listing of the store's keys."""
    if relative == CONSOLE_LOG:
        return CONSOLE_LOG_KEY
    if is_export(relative):
        return ONNX_KIND
    if not relative.startswith(f"{CHECKPOINTS_DIR}/"):
        return None
    name = relative.rpartition("/")[2]
    for kind, checkpoint_name in CHECKPOINTS.items():
        if name == checkpoint_name:
            return kind
    return TENSORBOARD_KIND if is_event_file(name) else None


def contained_file(path: Path, job_dir: Path) -> bool:
    """True when `path` is a file that lies inside `job_dir` once every symlink is followed."""
    return path.is_file() and is_inside(path, job_dir)


def _newest(paths: Iterable[Path], job_dir: Path) -> Path | None:
    # A temporary file is half a checkpoint; the patterns here never match one, and must not.
    files = [p for p in paths if not is_temp_file(p) and contained_file(p, job_dir)]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def _newest_on_disk(job_dir: Path, pattern: str) -> Path | None:
    """The newest file named like `pattern` under the job's checkpoints folder (SG's run folders)."""
    return _newest((job_dir / CHECKPOINTS_DIR).rglob(pattern), job_dir)


def _job_dir(job: Job) -> Path | None:
    return Path(job.job_dir) if job.job_dir else None


def find_checkpoint(job: Job, *kinds: str) -> Path | None:
    """The first of the checkpoint `kinds` (keys of CHECKPOINTS) the job has, with symlinks followed.

    For each kind: the file recorded when the job ended or, when none is recorded (the job is
    running, or its worker was lost before recording), the newest such file in its checkpoints
    folder. Only files inside the job's directory count. None when there is none.
    """
    job_dir = _job_dir(job)
    if job_dir is None:
        return None
    recorded = job.artifacts or {}
    for kind in kinds:
        path: Path | None
        if kind in recorded and contained_file(Path(recorded[kind]), job_dir):
            path = Path(recorded[kind])
        else:
            path = _newest_on_disk(job_dir, CHECKPOINTS[kind])
        if path is not None:
            return real(path)
    return None


def best_checkpoint(job: Job) -> Path | None:
    """The checkpoint prediction and export use: the job's best one."""
    return find_checkpoint(job, CKPT_BEST)


def init_checkpoint(job: Job) -> Path | None:
    """The checkpoint another job may start from: the job's best one, else its latest."""
    return find_checkpoint(job, CKPT_BEST, CKPT_LATEST)


def collect_artifacts(job_dir: Path) -> dict[str, str]:
    """What the worker records on a job when it ends: the newest of each checkpoint, the console log
    and the TensorBoard folder, by key (CHECKPOINTS' keys, `console_log`, `tensorboard_dir`)."""
    artifacts: dict[str, str] = {}
    console = console_log(job_dir)
    if contained_file(console, job_dir):
        artifacts[CONSOLE_LOG_KEY] = str(console)
    for kind, name in CHECKPOINTS.items():
        found = _newest_on_disk(job_dir, name)
        if found is not None:
            artifacts[kind] = str(found)
    events = _newest_on_disk(job_dir, TENSORBOARD_PATTERN)
    if events is not None:
        artifacts[TENSORBOARD_DIR_KEY] = str(events.parent)
    return artifacts


def remove_training_scratch(job_dir: Path) -> None:
    """Delete SG's model-averaging snapshots once training is over.

    `averaging_snapshots.pkl` holds ten full model copies (about 765 MB for YOLO-NAS-S) that SG
    needs only while training; the averaged model itself is kept as `average_model.pth`.
    """
    for path in (job_dir / CHECKPOINTS_DIR).rglob(AVERAGING_SNAPSHOTS):
        path.unlink(missing_ok=True)  # a symlink is removed itself, never what it points to


@dataclass(frozen=True)
class JobFile:
    """A file the API may serve: its kind (a checkpoint key, `console_log`, `tensorboard` or `onnx`)
    and its path with symlinks followed."""

    kind: str
    path: Path


def _candidates(job: Job, job_dir: Path) -> list[tuple[str, Path]]:
    """(kind, path) of every file `list_files` may list, before the containment check."""
    recorded = job.artifacts or {}
    items: list[tuple[str, Path]] = []
    for kind in CHECKPOINTS:
        path = find_checkpoint(job, kind)
        if path is not None:
            items.append((kind, path))
    items.append((CONSOLE_LOG_KEY, Path(recorded.get(CONSOLE_LOG_KEY, console_log(job_dir)))))
    if TENSORBOARD_DIR_KEY in recorded:
        events = Path(recorded[TENSORBOARD_DIR_KEY]).glob(TENSORBOARD_PATTERN)
    else:
        events = (job_dir / CHECKPOINTS_DIR).rglob(TENSORBOARD_PATTERN)
    items.extend((TENSORBOARD_KIND, path) for path in sorted(events) if is_event_file(path.name))
    items.append((ONNX_KIND, export_file(job_dir)))
    variants = job_dir.glob(EXPORT_VARIANTS)
    items.extend(
        (ONNX_KIND, path) for path in sorted(variants) if is_export(path.relative_to(job_dir).as_posix())
    )
    return items


def list_files(job: Job) -> dict[str, JobFile]:
    """The job's files the API may serve, by name: their path relative to the job directory.

    Checkpoints (as `find_checkpoint` finds them), the console log, TensorBoard event files and the
    ONNX export; only those that exist inside the job's directory. Empty before the job has run.
    """
    job_dir = _job_dir(job)
    if job_dir is None or not job_dir.is_dir():
        return {}
    root = real(job_dir)
    files: dict[str, JobFile] = {}
    for kind, path in _candidates(job, job_dir):
        if contained_file(path, root):
            resolved = real(path)
            files[listed_name(files, kind, resolved.relative_to(root).as_posix())] = JobFile(kind, resolved)
    return files


def listed_name(taken: Mapping[str, object], kind: str, relative: str) -> str:
    """The name a listing gives the file at `relative` (POSIX, in the job directory) of artifact
    `kind`: the path itself, but an event file's shortened (`_event_file_name`) and made unique
    among the names already `taken`."""
    if kind != TENSORBOARD_KIND:
        return relative
    return _unique(taken, _event_file_name(relative))


# TensorFlow names event files `events.out.tfevents.<time>.<host name>.<pid>.<n><suffix>`: served
# as `events.out.tfevents.<time>` (TensorBoard reads any file with "tfevents" in its name), so a
# listing names no host and no process.
_EVENT_FILE = re.compile(r"^(?P<dir>(?:.*/)?)(?P<stem>events\.out\.tfevents\.\d+)\..*$")


def _event_file_name(name: str) -> str:
    match = _EVENT_FILE.match(name)
    return f"{match['dir']}{match['stem']}" if match else name


def _unique(taken: Mapping[str, object], name: str) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}.{n}", n + 1
    return candidate


def find_file(job: Job, name: str) -> JobFile | None:
    """The listed file called `name`, or None for any name `list_files` does not list."""
    return list_files(job).get(name)
