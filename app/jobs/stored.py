"""A job's files in the store (`SGJOBS_STORAGE_URL`): what it lists, and its checkpoints as local files.

With the default local store a job's files are its directory (`app.jobs.files` reads them there).
With a remote store the training process uploads them under `job_key(job id, <path in the job
directory>)`, and every other machine (the API, the inference process, another worker) has a home of
its own: the job's recorded `job_dir` and `artifacts` paths are the training machine's and are never
read here. The names and rules are `app.jobs.files`' (`stored_kind`, `listed_name`), so a job lists
the same whichever store holds it; the newest of each checkpoint kind is chosen by the store's
modification time, as `files` chooses by the file's.

No FastAPI here: the worker uses `local_checkpoint` too (to start a job from another's checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from app.jobs import files
from app.ml.layout import serving_onnx_path
from app.storage import ObjectInfo, ObjectMissing, Store, open_cache, open_store

if TYPE_CHECKING:
    from app.jobs.models import Job
    from app.settings import Settings


@dataclass(frozen=True)
class StoredFile:
    """A job's file in the store that the API may serve: its kind (as `files.JobFile`'s), its key,
    size in bytes and last change (aware, UTC)."""

    kind: str
    key: str
    size: int
    mtime: datetime


def _relative(job_id: str, key: str) -> str:
    """The path in the job directory of one of the job's keys."""
    return key.removeprefix(files.job_key(job_id) + "/")


def _classified(store: Store, job_id: str) -> list[tuple[str, str, ObjectInfo]]:
    """(kind, relative path, object) of each of the job's objects that is an artifact, by key."""
    found = []
    for info in store.list(files.job_key(job_id)):
        relative = _relative(job_id, info.key)
        kind = files.stored_kind(relative)
        if kind is not None:
            found.append((kind, relative, info))
    return found


def _newest(objects: list[tuple[str, str, ObjectInfo]], kind: str) -> ObjectInfo | None:
    # The first of equal times, as `max` over a job directory's files picks.
    matching = [info for found, _, info in objects if found == kind]
    return max(matching, key=lambda info: info.mtime) if matching else None


def list_stored_files(store: Store, job: Job) -> dict[str, StoredFile]:
    """The job's files in `store` the API may serve, by name, as `files.list_files` names them: the
    newest of each checkpoint kind, the console log, TensorBoard event files (shortened names) and
    the ONNX exports. Empty when the store holds nothing of the job. `StorageError` when the store
    fails."""
    objects = _classified(store, job.id)
    listed: dict[str, StoredFile] = {}
    for kind in files.CHECKPOINTS:
        newest = _newest(objects, kind)
        if newest is not None:
            listed[_relative(job.id, newest.key)] = StoredFile(kind, newest.key, newest.size, newest.mtime)
    others = [item for item in objects if item[0] not in files.CHECKPOINTS]
    # The order `list_files` lists them in: console log, event files, the exports.
    order = {files.CONSOLE_LOG_KEY: 0, files.TENSORBOARD_KIND: 1, files.ONNX_KIND: 2}

    def place(item: tuple[str, str, ObjectInfo]) -> tuple[int, bool, str]:
        kind, relative, _ = item
        return order[kind], relative != files.EXPORT_NAME, relative

    for kind, relative, info in sorted(others, key=place):
        name = files.listed_name(listed, kind, relative)
        listed[name] = StoredFile(kind, info.key, info.size, info.mtime)
    return listed


def stored_checkpoint(store: Store, job: Job, *kinds: str) -> ObjectInfo | None:
    """The newest stored object of the first of the checkpoint `kinds` (keys of `files.CHECKPOINTS`)
    the job has in `store`; None when it has none."""
    objects = _classified(store, job.id)
    for kind in kinds:
        newest = _newest(objects, kind)
        if newest is not None:
            return newest
    return None


def checkpoint_location(settings: Settings, job: Job, *kinds: str) -> str | None:
    """Where the first of the checkpoint `kinds` the job has is, for messages and events: its path
    (local store, `files.find_checkpoint`) or its key in the store; None when it has none. Nothing
    is downloaded."""
    store = open_store(settings)
    if store.is_local:
        path = files.find_checkpoint(job, *kinds)
        return str(path) if path is not None else None
    info = stored_checkpoint(store, job, *kinds)
    return info.key if info is not None else None


def has_checkpoint(settings: Settings, job: Job, *kinds: str) -> bool:
    """True when the job has one of the checkpoint `kinds`, in its directory (local store) or in
    the store; nothing is downloaded."""
    return checkpoint_location(settings, job, *kinds) is not None


def local_checkpoint(settings: Settings, job: Job, *kinds: str) -> Path | None:
    """The first of the checkpoint `kinds` the job has, as a local file; None when it has none.

    Local store: `files.find_checkpoint` (the job's own directory). Remote store: the newest stored
    object of the first kind present, downloaded into the store cache (`open_cache`), and with it
    the checkpoint's serving ONNX file (`serving_onnx_path`) when the store has one at least as new:
    fetched after the checkpoint, so that its copy is at least as new as the checkpoint's too (the
    inference engine serves the ONNX file only then). `StorageError` when the store fails.
    """
    store = open_store(settings)
    if store.is_local:
        return files.find_checkpoint(job, *kinds)
    info = stored_checkpoint(store, job, *kinds)
    if info is None:
        return None
    cache = open_cache(settings, store)
    try:
        checkpoint = cache.local_file(info.key)
    except ObjectMissing:  # deleted since the listing (the job was deleted): no checkpoint
        return None
    onnx_key = serving_onnx_path(Path(info.key)).as_posix()
    onnx = store.stat(onnx_key)
    if onnx is not None and onnx.mtime >= info.mtime:
        try:
            cache.local_file(onnx_key)
        except ObjectMissing:  # replaced meanwhile: the checkpoint is served with torch
            pass
    return checkpoint
