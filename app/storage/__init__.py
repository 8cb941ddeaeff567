"""Artifacts in a store: a local folder (the default) or an S3-compatible bucket (`SGJOBS_STORAGE_URL`).

- `Store` (protocol), `LocalStore`, `S3Store`, `open_store(settings)`: put, get, stat, list, delete.
- `StoreCache`: objects as local files, downloaded on demand into a folder of bounded size.
- `Mirror` / `pull`: upload a folder's changed files; download a prefix.

Keys are POSIX relative paths (`jobs/<id>/checkpoints/...`). Standard library only here; boto3 is
imported at the first request to an S3 store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ObjectInfo,
    ObjectMissing,
    StorageError,
    Store,
    UnsafeKey,
    check_key,
)
from app.storage.cache import StoreCache
from app.storage.local import LocalStore
from app.storage.mirror import Mirror, pull
from app.storage.s3 import S3Store
from app.storage.url import StorageUrl, parse_storage_url

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "CACHE_FOLDER",
    "DEFAULT_CHUNK_SIZE",
    "LocalStore",
    "Mirror",
    "ObjectInfo",
    "ObjectMissing",
    "S3Store",
    "StorageError",
    "StorageUrl",
    "Store",
    "StoreCache",
    "UnsafeKey",
    "check_key",
    "open_cache",
    "open_store",
    "parse_storage_url",
    "remote_store",
    "pull",
]

# The cache of a remote store's objects, in SGJOBS_HOME (each machine's own).
CACHE_FOLDER = "store-cache"


def open_store(settings: Settings) -> Store:
    """The store `settings.storage_url` names: the home folder ("") or an S3 bucket's prefix."""
    url = parse_storage_url(settings.storage_url)
    if url.scheme == "s3":
        return S3Store(url.bucket, url.prefix)
    return LocalStore(settings.home)


def remote_store(settings: Settings) -> Store | None:
    """The store when it is not the local home folder (then uploads and registered weights are
    copied to it), else None."""
    store = open_store(settings)
    return None if store.is_local else store


def open_cache(settings: Settings, store: Store | None = None) -> StoreCache:
    """The bounded local cache of `store` (default: `open_store(settings)`) under the home."""
    return StoreCache(
        store if store is not None else open_store(settings),
        settings.home / CACHE_FOLDER,
        settings.storage_cache_max_bytes,
    )
