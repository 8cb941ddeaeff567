"""Keeping a local folder and a store prefix in step: `Mirror.push` uploads what changed (the worker,
at every epoch end), `pull` downloads a whole prefix (a worker resuming a job another one ran)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from app.paths import is_inside
from app.storage.base import TEMP_SUFFIX, Store, check_prefix, join_key

# Files still being written by their producer (super-gradients, torch.save through a temporary
# name) or by us: uploading one would store half a file.
SKIPPED_SUFFIXES = (".tmp", TEMP_SUFFIX)


def pull(store: Store, prefix: str, dest: Path) -> list[Path]:
    """Download every object under the folder `prefix` to the same relative place under `dest`;
    the files written, by key. For a local store whose file is `dest`'s own, nothing is copied."""
    prefix = check_prefix(prefix)
    dest = Path(dest)
    written = []
    for info in store.list(prefix):
        relative = info.key[len(prefix) + 1 :] if prefix else info.key
        target = dest / relative
        store.get_file(info.key, target)
        written.append(target)
    return written


class Mirror:
    """Uploads the files under `local_root` to `prefix` of `store`, each again only when its size or
    mtime changed since this mirror last uploaded (or pulled) it."""

    def __init__(self, store: Store, local_root: Path, prefix: str) -> None:
        self.store = store
        self.local_root = Path(local_root)
        self.prefix = check_prefix(prefix)
        # Relative path -> (size, mtime_ns) of the file as it was when last uploaded or pulled.
        self.state: dict[str, tuple[int, int]] = {}

    def push(self, paths: Iterable[Path] | None = None) -> list[str]:
        """Upload the changed files among `paths` (default: every file under `local_root`); the keys
        uploaded. A file that changes during its upload differs from its recorded state, so the next
        push uploads it again."""
        candidates = self._all_files() if paths is None else [Path(p) for p in paths]
        uploaded = []
        for path in candidates:
            if path.name.endswith(SKIPPED_SUFFIXES) or not is_inside(path, self.local_root):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # replaced or removed since it was listed
                continue
            if not path.is_file():
                continue
            relative = path.resolve().relative_to(self.local_root.resolve()).as_posix()
            seen = (st.st_size, st.st_mtime_ns)
            if self.state.get(relative) == seen:
                continue
            key = join_key(self.prefix, relative)
            self.store.put_file(key, path)
            # Recorded as it was before the upload began (see the docstring).
            self.state[relative] = seen
            uploaded.append(key)
        return uploaded

    def pull(self) -> list[Path]:
        """`pull` this mirror's prefix into `local_root`, recording what came so that the next push
        leaves those files alone."""
        written = pull(self.store, self.prefix, self.local_root)
        root = self.local_root.resolve()
        for path in written:
            st = path.stat()
            self.state[path.resolve().relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
        return written

    def _all_files(self) -> list[Path]:
        found: list[Path] = []
        for folder, _dirs, files in os.walk(self.local_root):
            found.extend(Path(folder, name) for name in sorted(files))
        return sorted(found)
