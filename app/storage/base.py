"""What every store offers (`Store`), the facts about one object (`ObjectInfo`), keys and errors.

A key is a POSIX relative path such as `jobs/<id>/checkpoints/train/RUN_x/ckpt_best.pth`: the same
string names a file under a local folder and an object under an S3 bucket's prefix, so a key must
be spelled one way only (no `.`, `..` or empty parts, no backslashes, no leading or trailing `/`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

from app.errors import InvalidInput, NotFound, ServiceUnavailable
from app.paths import unsafe_relative

# What `open_stream` yields at a time unless told otherwise: large enough for few system calls,
# small enough that many concurrent downloads hold little memory.
DEFAULT_CHUNK_SIZE = 1024 * 1024
# Files a store or the cache is still writing carry this suffix until they are renamed into place;
# listings skip them.
TEMP_SUFFIX = ".sgjobs-part"


class StorageError(ServiceUnavailable):
    """503: the object store failed (unreachable, refused the credentials, no such bucket, ...).

    The message names the bucket and key; the service answers with Retry-After like any 503.
    """

    code = "storage_unavailable"


class ObjectMissing(NotFound):
    """404: no object under this key (`stat` answers None instead)."""

    code = "object_missing"


class UnsafeKey(InvalidInput):
    """422: a key that could leave its folder or that is not spelled in its one canonical way."""

    code = "unsafe_key"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes, last change (aware, UTC) and a version token.

    `etag` changes whenever the content does: the S3 ETag, or size and mtime for a local file.
    """

    key: str
    size: int
    mtime: datetime
    etag: str


def check_key(key: str) -> str:
    """`key` itself when it is safe and canonical; else `UnsafeKey`."""
    if unsafe_relative(key) or "\\" in key or PurePosixPath(key).as_posix() != key or "/./" in f"/{key}/":
        raise UnsafeKey(f"storage key {key!r} is not a plain relative path (a/b/c)")
    return key


def check_prefix(prefix: str) -> str:
    """A folder prefix, canonical and without its trailing `/` ("" for everything)."""
    prefix = prefix.rstrip("/")
    return check_key(prefix) if prefix else ""


def join_key(prefix: str, name: str) -> str:
    """`prefix/name`, or `name` under the empty prefix."""
    return f"{prefix}/{name}" if prefix else name


@runtime_checkable
class Store(Protocol):
    """Where artifacts live: a local folder (`LocalStore`) or an S3 bucket's prefix (`S3Store`).

    Every method checks its key (`UnsafeKey`); failures of the store itself are `StorageError`.
    """

    @property
    def is_local(self) -> bool:
        """True when keys are files on this machine (`local_path` gives them)."""
        ...

    @property
    def url(self) -> str:
        """Where the store is, for messages and logs (`s3://bucket/prefix`, a folder's path)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file a key names on this machine (it need not exist); None for a remote store."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`, replacing what was there."""
        ...

    def get_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` (through a temporary name beside it); `ObjectMissing` if none."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's facts, or None when there is none."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under the folder `prefix` (recursively), sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; nothing happens when there is none."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under the folder `prefix` (never the whole store); how many went."""
        ...

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The object's bytes in chunks (an HTTP download's body); `ObjectMissing` at the call."""
        ...
