"""Registered weights in the store (`SGJOBS_STORAGE_URL`): the file is uploaded under
`weights/<id>/weights.pth` before the registration commits, and a machine without it (a worker with
another home, an API replica) reads it through its `StoreCache`.

With the default local store nothing here copies anything: `<weights_dir>/store/<id>.pth` is the
only copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from app.storage import ObjectMissing, open_cache, remote_store

if TYPE_CHECKING:
    from app.settings import Settings

# Registered weights' folder in the store: `weights/<id>/<name>`.
WEIGHTS_PREFIX = "weights"
WEIGHTS_NAME = "weights.pth"


def weights_key(weights_id: str, relative: str = "") -> str:
    """The store key of `relative` (POSIX) in the weights' folder; "" for the folder."""
    prefix = f"{WEIGHTS_PREFIX}/{weights_id}"
    return f"{prefix}/{relative}" if relative else prefix


def push_weights(settings: Settings, weights_id: str, path: Path) -> None:
    """Upload the weights' file to a remote store (nothing for the local one); raises StorageError."""
    store = remote_store(settings)
    if store is not None:
        store.put_file(weights_key(weights_id, WEIGHTS_NAME), path)


def local_weights(settings: Settings, weights_id: str, path: Path) -> Path | None:
    """The weights' file on this machine: `path` (where registration put it) when it is there, else
    the cached copy of the stored object; None when neither exists."""
    if path.is_file():
        return path
    store = remote_store(settings)
    if store is None:
        return None
    try:
        return open_cache(settings, store).local_file(weights_key(weights_id, WEIGHTS_NAME))
    except ObjectMissing:
        return None


def weights_stored(settings: Settings, weights_id: str, path: Path) -> bool:
    """Whether the weights' file is at `path` or in a remote store: a stat, nothing downloaded (a
    job that starts from the weights fetches them on its worker)."""
    if path.is_file():
        return True
    store = remote_store(settings)
    return store is not None and store.stat(weights_key(weights_id, WEIGHTS_NAME)) is not None


def delete_stored(settings: Settings, weights_id: str) -> None:
    """Remove unregistered weights' objects from a remote store (nothing for the local one)."""
    store = remote_store(settings)
    if store is not None:
        store.delete_prefix(weights_key(weights_id))
