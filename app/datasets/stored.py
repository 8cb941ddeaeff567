"""Uploaded datasets in the store (`SGJOBS_STORAGE_URL`): the API uploads an extracted upload under
`datasets/<id>/`, and a machine that lacks the folder (a worker with another home) pulls it.

With the default local store nothing here copies anything: the upload folder is the only copy.
A pull downloads into a scratch folder beside the upload folder and renames it into place once
every file is there, so a crash mid-download never leaves a folder that looks like a whole dataset.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from app.storage import Store, pull, remote_store

if TYPE_CHECKING:
    from app.settings import Settings

# A dataset's folder in the store: `datasets/<id>/<path in its upload folder>`.
DATASETS_PREFIX = "datasets"
# Scratch folders of pulls in progress (or interrupted), beside the upload folders.
PULLING_MARK = ".pulling-"


def dataset_key(dataset_id: str, relative: str = "") -> str:
    """The store key of the file at `relative` (POSIX) in the upload folder; "" for the folder."""
    prefix = f"{DATASETS_PREFIX}/{dataset_id}"
    return f"{prefix}/{relative}" if relative else prefix


def push_upload(store: Store, dataset_id: str, folder: Path) -> None:
    """Upload every file of the upload `folder` (raises StorageError; the caller cleans up)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(dataset_key(dataset_id, path.relative_to(folder).as_posix()), path)


def fetch_upload(store: Store, dataset_id: str, folder: Path) -> bool:
    """Make sure `folder` holds the uploaded dataset: pull it from the store when it is absent.
    False when the store has nothing for the dataset."""
    if folder.is_dir():
        return True
    scratch = folder.with_name(f"{PULLING_MARK}{folder.name}-{uuid.uuid4().hex}")
    try:
        if not pull(store, dataset_key(dataset_id), scratch):
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch, folder)
        except OSError:
            # Another process renamed its complete copy into place first.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return True


def delete_upload(settings: Settings, dataset_id: str) -> None:
    """Remove an unregistered dataset's objects from a remote store (nothing for the local one)."""
    store = remote_store(settings)
    if store is not None:
        store.delete_prefix(dataset_key(dataset_id))
