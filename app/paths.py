"""Path containment: the one rule every check that keeps a path inside a folder uses.

Untrusted names (a dataset path in a spec, a file name in an annotation file, a download name, a
member of an archive) are first checked as text with `unsafe_relative`, then resolved with every
symlink followed and compared with `is_inside`: a link that leads out of the folder is outside.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

# The datasets directory's folder of uploaded datasets. Tenants' own folders sit beside it, so no
# tenant may have this name.
UPLOADS_FOLDER = "uploads"
# The folder inside a dataset where the service caches what it derived from it (decoded Hugging Face
# splits). Only the service writes it: an uploaded archive's copy is never extracted.
DATASET_CACHE_FOLDER = ".sgjobs-cache"


def unsafe_relative(name: str) -> bool:
    """True for names that could leave their folder: empty, absolute, with `..` parts or NUL bytes."""
    if not name or "\x00" in name:
        return True
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


def real(path: Path) -> Path:
    """`path` with every symlink followed (it need not exist)."""
    return Path(os.path.realpath(path))


def is_inside(path: Path, root: Path) -> bool:
    """True when `path` is `root` or lies under it, after following symlinks on both."""
    resolved, base = real(path), real(root)
    return resolved == base or resolved.is_relative_to(base)


def resolve_inside(root: Path, name: str) -> Path | None:
    """`root / name` resolved, or None when the name is unsafe or the result lies outside `root`."""
    if unsafe_relative(name):
        return None
    candidate = real(root / name)
    return candidate if is_inside(candidate, root) else None
