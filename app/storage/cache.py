"""`StoreCache`: objects of a remote store as local files, in a folder of bounded size.

The API, the inference process and a resuming worker need files (torch and onnxruntime open
paths). A remote object is downloaded to `root/<key>` when there is no copy or the copy's recorded
size and ETag differ from the store's (while the store is unreachable, a complete earlier copy is
served); the least recently used copies are deleted to keep the folder
under `max_bytes`. Several processes may share one cache folder: each key is fetched under an
exclusive lock (`fcntl.flock`) by one process while the others wait, files appear by rename, and
eviction ignores files that another process removed first. A file the caller holds open stays
readable after it is evicted or replaced (POSIX unlink semantics), so open the path promptly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from app.paths import resolve_inside
from app.storage.base import (
    TEMP_SUFFIX,
    ObjectInfo,
    ObjectMissing,
    StorageError,
    Store,
    UnsafeKey,
    check_key,
)
from app.storage.local import temp_beside

# Beside the copies, in folders no key can reach (keys never start with a dot folder of ours):
# what each copy is (size, ETag) and the per-key locks.
INDEX_FOLDER = ".sgjobs-cache-index"
LOCK_FOLDER = ".sgjobs-cache-locks"

logger = logging.getLogger(__name__)


class StoreCache:
    """Readable local files for the keys of `store`; for a local store, its own files."""

    def __init__(self, store: Store, root: Path, max_bytes: int) -> None:
        self.store = store
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes

    def local_file(self, key: str) -> Path:
        """A local file with the object's current content; `ObjectMissing` when there is none."""
        own = self.store.local_path(key)
        if own is not None:
            if not own.is_file():
                raise ObjectMissing(f"no object {key!r} in {self.store.url}")
            return own
        path = self._copy_path(key)
        with self._locked(key):
            try:
                info = self.store.stat(key)
            except StorageError:
                # The store is unreachable: a copy fetched before is served rather than nothing
                # (artifacts are rarely rewritten: a finished job's checkpoints never are).
                recorded = self._recorded(key, path)
                if recorded is None:
                    raise
                logger.warning("object store unreachable: serving the cached copy of %s", key)
                return path
            if info is None:
                self._forget(key, path)
                raise ObjectMissing(f"no object {key!r} in {self.store.url}")
            if self._fresh(key, path, info):
                try:
                    os.utime(path)  # most recently used: evicted last
                except FileNotFoundError:  # evicted by another process just now
                    pass
                else:
                    return path
            self.store.get_file(key, path)
            self._record(key, info)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> int:
        """Delete the least recently used copies until the folder holds at most `max_bytes`
        (never `keep`); the bytes freed."""
        copies: list[tuple[int, int, Path]] = []
        for folder, dirs, files in os.walk(self.root):
            if folder == str(self.root):
                dirs[:] = [d for d in dirs if d not in (INDEX_FOLDER, LOCK_FOLDER)]
            for name in files:
                # Files being written here (downloads, and exports made in the cache folder before
                # their upload: `.model.<pid>.tmp.onnx`, `<name>.<pid>-<token>.tmp`) are not copies.
                if name.endswith((TEMP_SUFFIX, ".tmp")) or name.startswith("."):
                    continue
                path = Path(folder, name)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                copies.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in copies)
        freed = 0
        for _, size, path in sorted(copies, key=lambda c: c[0]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            key = path.relative_to(self.root).as_posix()
            path.unlink(missing_ok=True)
            self._index_path(key).unlink(missing_ok=True)
            total -= size
            freed += size
        return freed

    def _copy_path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] in (INDEX_FOLDER, LOCK_FOLDER):
            raise UnsafeKey(f"storage key {key!r} names the cache's own folder")
        path = resolve_inside(self.root, key)
        if path is None:
            raise UnsafeKey(f"storage key {key!r} leads out of {self.root}")
        return path

    def _index_path(self, key: str) -> Path:
        return self.root / INDEX_FOLDER / f"{key}.json"

    def _recorded(self, key: str, path: Path) -> ObjectInfo | None:
        """What the copy at `path` was fetched as, when it is complete (its size is the recorded one)."""
        try:
            recorded = json.loads(self._index_path(key).read_text())
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("size") != st.st_size:
            return None
        mtime = datetime.fromtimestamp(st.st_mtime, tz=UTC)
        return ObjectInfo(key=key, size=st.st_size, mtime=mtime, etag=str(recorded.get("etag")))

    def _fresh(self, key: str, path: Path, info: ObjectInfo) -> bool:
        recorded = self._recorded(key, path)
        return recorded is not None and (recorded.size, recorded.etag) == (info.size, info.etag)

    def _record(self, key: str, info: ObjectInfo) -> None:
        index = self._index_path(key)
        index.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_beside(index)
        temp.write_text(json.dumps({"size": info.size, "etag": info.etag}))
        os.replace(temp, index)

    def _forget(self, key: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._index_path(key).unlink(missing_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        # One lock file per key, named by its hash (keys may be long); never deleted, because a
        # process waiting on a lock file that another deleted would lock a file nobody else sees.
        folder = self.root / LOCK_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
