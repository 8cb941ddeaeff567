"""`LocalStore`: keys are files under one folder (SGJOBS_HOME by default): today's layout, unchanged."""

from __future__ import annotations

import os
import shutil
import stat as stat_mode
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from app.paths import real, resolve_inside
from app.storage.base import (
    DEFAULT_CHUNK_SIZE,
    TEMP_SUFFIX,
    ObjectInfo,
    ObjectMissing,
    UnsafeKey,
    check_key,
    check_prefix,
    join_key,
)


def temp_beside(path: Path) -> Path:
    """A fresh temporary name in `path`'s folder (hidden, with `TEMP_SUFFIX`): renamed over `path`
    when complete, so readers never see half a file."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def copy_into_place(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` through a temporary name beside it; nothing when they are one file."""
    if real(source) == real(dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(dest)
    try:
        shutil.copyfile(source, temp)
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    # Size and mtime in nanoseconds: what changes when a file is rewritten, without reading it.
    return ObjectInfo(
        key=key,
        size=st.st_size,
        mtime=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
        etag=f"{st.st_size:x}-{st.st_mtime_ns:x}",
    )


class LocalStore:
    """Keys map to files under `root` (symlinks that lead out of it are refused)."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = resolve_inside(self.root, check_key(key))
        if path is None:
            raise UnsafeKey(f"storage key {key!r} leads out of {self.root}")
        return path

    def local_path(self, key: str) -> Path:
        """The file `key` names (it need not exist)."""
        return self._path(key)

    def put_file(self, key: str, path: Path) -> None:
        """Copy `path` to the key's file; a file already at its own place stays as it is."""
        copy_into_place(Path(path), self._path(key))

    def get_file(self, key: str, dest: Path) -> None:
        """Copy the key's file to `dest`; `ObjectMissing` when there is none."""
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(f"no object {key!r} in {self.root}")
        copy_into_place(source, Path(dest))

    def stat(self, key: str) -> ObjectInfo | None:
        """The file's size, mtime and a version token (size and mtime_ns), or None."""
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _info(key, st) if stat_mode.S_ISREG(st.st_mode) else None

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every file under the folder `prefix`, by key (files being written are left out)."""
        prefix = check_prefix(prefix)
        top = self._path(prefix) if prefix else self.root
        found: list[ObjectInfo] = []
        for folder, _dirs, files in os.walk(top):
            rel = Path(folder).relative_to(top).as_posix()
            for name in files:
                if name.endswith(TEMP_SUFFIX):
                    continue
                key = join_key(prefix, name if rel == "." else f"{rel}/{name}")
                try:
                    found.append(_info(key, os.stat(os.path.join(folder, name))))
                except FileNotFoundError:  # deleted while we walked
                    continue
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Remove the key's file (nothing when there is none)."""
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Remove the folder `prefix` and everything in it; the number of files that were in it."""
        if not check_prefix(prefix):
            raise UnsafeKey("delete_prefix needs a folder: the whole store is never deleted")
        count = len(self.list(prefix))
        path = self._path(check_prefix(prefix))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            # A key, not a folder: nothing lies under it.
            return 0
        return count

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The file's bytes in chunks; opened now, so a missing file is `ObjectMissing` at the call."""
        try:
            handle = self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.root}") from None
        return _chunks(handle, chunk_size)


def _chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk
