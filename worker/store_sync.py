"""A job directory and its folder in a remote store (`SGJOBS_STORAGE_URL=s3://...`), kept in step by
the training process: what earlier attempts uploaded comes down before the attempt picks its resume
checkpoint, and what this attempt writes goes up every `storage_sync_seconds` and once more before it
ends. With the default local store the job directory is the store's own folder: nothing to do.

Which version of a file is newer is decided by a record kept in the job directory
(`.sgjobs-store.json`: for each key, the ETag this machine last uploaded or downloaded, and the local
file's size and mtime then). A stored object whose ETag is not the recorded one was written by another
machine, so it replaces the local file; a local file that changed since its record was written here,
so it is uploaded. A machine that resumes the job after another one trained it further therefore
starts from the other's checkpoint, never from its own older one.

Every file is uploaded from a snapshot taken just before. A checkpoint or export is replaced by
renaming a new file over it, never changed in place, so a hard link is its snapshot (a multipart
upload that reopened the path could otherwise mix two versions); the console log and TensorBoard
files grow while they are read, so they are copied (an upload of a growing file fails on its length).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

from app.jobs import files
from app.ml.types import CHECKPOINTS_DIR
from app.paths import is_inside, real
from app.settings import Settings
from app.storage import Store, open_store
from app.storage.base import TEMP_SUFFIX

logger = logging.getLogger(__name__)

# Files only ever replaced whole (written to a temporary name, then renamed into place).
_REPLACED_WHOLE = frozenset({".pth", ".onnx"})
# The record, in the job directory (never uploaded: it describes this machine's copy).
STATE_FILE = ".sgjobs-store.json"


class JobSync:
    """Downloads a job's stored checkpoints and uploads its new files; for a remote store only."""

    def __init__(self, store: Store, job_dir: Path, job_id: str) -> None:
        self.store = store
        self.job_dir = job_dir
        self.job_id = job_id
        self._lock = threading.Lock()
        # key -> {"etag": ..., "size": ..., "mtime_ns": ...} as of this machine's last transfer.
        self._state: dict[str, dict[str, object]] = self._load()

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads((self.job_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        path = self.job_dir / STATE_FILE
        temp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        temp.write_text(json.dumps(self._state))
        temp.replace(path)

    def _key(self, path: Path) -> str:
        return files.job_key(self.job_id, path.relative_to(self.job_dir).as_posix())

    def pull_checkpoints(self) -> list[str]:
        """Download the stored checkpoints (and TensorBoard files) that another machine wrote or this
        one lacks; the keys downloaded."""
        prefix = files.job_key(self.job_id, CHECKPOINTS_DIR)
        fetched = []
        with self._lock:
            for info in self.store.list(prefix):
                target = self.job_dir / info.key.removeprefix(files.job_key(self.job_id) + "/")
                known = self._state.get(info.key)
                if target.is_file() and known is not None and known.get("etag") == info.etag:
                    continue  # this machine's own copy, possibly newer than the stored one
                self.store.get_file(info.key, target)
                st = target.stat()
                self._state[info.key] = {"etag": info.etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                fetched.append(info.key)
            if fetched:
                self._save()
        return fetched

    def push(self) -> list[str]:
        """Upload every file of `files.files_to_store` that changed since this machine last
        transferred it; the keys uploaded."""
        uploaded = []
        with self._lock:
            for path in files.files_to_store(self.job_dir):
                if path.name.endswith(TEMP_SUFFIX):
                    continue
                key = self._key(path)
                snapshot = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.upload.tmp")
                try:
                    if path.suffix in _REPLACED_WHOLE:
                        os.link(path, snapshot)
                        st = snapshot.stat()
                    else:
                        # Stated before the copy: what grows meanwhile goes up next time.
                        st = path.stat()
                        shutil.copyfile(path, snapshot)
                except FileNotFoundError:  # replaced or removed since it was listed
                    continue
                try:
                    known = self._state.get(key)
                    if known is not None and (known.get("size"), known.get("mtime_ns")) == (
                        st.st_size,
                        st.st_mtime_ns,
                    ):
                        continue
                    self.store.put_file(key, snapshot)
                    info = self.store.stat(key)
                    etag = info.etag if info is not None else None
                    self._state[key] = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                    uploaded.append(key)
                finally:
                    snapshot.unlink(missing_ok=True)
            if uploaded:
                self._save()
        return uploaded


class Uploader:
    """Pushes a `JobSync` every `interval` seconds on a thread of its own, while training runs."""

    def __init__(self, sync: JobSync, interval: float) -> None:
        self.sync = sync
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-uploader", daemon=True)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync.push()
            except Exception as exc:  # a store blip: the next round (or the final push) tries again
                logger.warning("upload to the store failed, retrying: %s", exc)

    def stop(self) -> None:
        """Stop the thread (after its current round); the caller does the final push."""
        self._stop.set()
        self._thread.join()


def job_sync(settings: Settings, job_dir: Path, job_id: str) -> JobSync | None:
    """The `JobSync` of the job when the store is remote; None for the local store."""
    store = open_store(settings)
    if store.is_local:
        return None
    job_dir.mkdir(parents=True, exist_ok=True)
    return JobSync(store, job_dir, job_id)


def drop_local_copy(settings: Settings, job_dir: Path) -> bool:
    """With a remote store, delete the local directory of a job this machine's attempt ended: the
    store has everything (a later resume downloads it), and a GPU machine's disk is not an archive.
    True when it was removed."""
    if open_store(settings).is_local or not is_inside(job_dir, settings.jobs_dir):
        return False
    if real(job_dir) == real(settings.jobs_dir):
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return True
