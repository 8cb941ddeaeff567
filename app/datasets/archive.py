"""Safe extraction of uploaded dataset archives (zip, tar, tar.gz/bz2/xz).

An upload is untrusted: every member is checked before anything is written, and the bytes actually
written are counted again while extracting (a zip's declared sizes can lie). Nothing may land outside
the destination folder (zip slip), links and device files are refused, and the limits from the
settings (compressed size, uncompressed size, member count, compression ratio) answer 413 (sizes)
or 422 (everything else) naming the limit. Pure standard library.
"""

from __future__ import annotations

import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import InvalidInput, PayloadTooLarge
from app.paths import resolve_inside

CHUNK = 1 << 20
# Archivers add these; they are not part of any dataset.
_SKIPPED_PREFIXES = ("__MACOSX/",)
_SKIPPED_NAMES = frozenset({".DS_Store", "Thumbs.db"})


@dataclass(frozen=True)
class ArchiveLimits:
    """The upload limits (see `Settings.upload_*`)."""

    max_bytes: int
    max_uncompressed_bytes: int
    max_members: int
    max_ratio: float


@dataclass(frozen=True)
class Extracted:
    """What an extraction wrote."""

    files: int
    bytes: int


class ArchiveError(InvalidInput):
    """The archive is corrupt, of an unknown kind, or holds a member that is not allowed (422)."""

    code = "invalid_archive"
    extension = "limits"  # details, when given, name the limit


class ArchiveTooLarge(PayloadTooLarge):
    """A size limit was broken (413); `details` names the limit and its value."""

    code = "archive_too_large"


def _too_large(limit: str, value: float, message: str) -> ArchiveTooLarge:
    return ArchiveTooLarge(message, details=[{"limit": limit, "value": value}])


def _limit_error(limit: str, value: float, message: str) -> ArchiveError:
    return ArchiveError(message, details=[{"limit": limit, "value": value}])


def archive_kind(path: Path) -> str:
    """'zip' or 'tar', from the magic bytes (the client's file name and content type are not trusted)."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        pass
    raise ArchiveError("the upload is not a zip or tar archive (or it is corrupt)")


def _member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, None for entries to skip; raises for names that leave the folder."""
    clean = name.replace("\\", "/")
    if not clean or "\x00" in clean:
        raise ArchiveError(f"archive member {name!r} has an invalid name")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise ArchiveError(f"archive member {name!r} has an absolute path (zip slip)")
    path = PurePosixPath(clean)
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} leads outside the dataset folder (zip slip)")
    if any(clean.startswith(p) for p in _SKIPPED_PREFIXES) or path.name in _SKIPPED_NAMES:
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _target(dest: Path, rel: PurePosixPath) -> Path:
    # `_member_path` already refused names that leave the folder; this also follows symlinks.
    target = resolve_inside(dest, rel.as_posix())
    if target is None:
        raise ArchiveError(f"archive member {str(rel)!r} leads outside the dataset folder (zip slip)")
    return target


class _Budget:
    """Counts bytes written against the uncompressed-size and ratio limits."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        # The ratio limit is meaningless for tiny archives (a 1 KB zip of zeros is harmless).
        self.ratio_cap = max(limits.max_ratio * self.archive_bytes, 16 * CHUNK)
        self.written = 0

    def check_declared(self, total: int) -> None:
        self._check(total, declared=True)

    def add(self, count: int) -> None:
        self.written += count
        self._check(self.written, declared=False)

    def _check(self, total: int, *, declared: bool) -> None:
        what = "declares" if declared else "expands to"
        if total > self.limits.max_uncompressed_bytes:
            raise _too_large(
                "upload_max_uncompressed_bytes",
                self.limits.max_uncompressed_bytes,
                f"the archive {what} more than upload_max_uncompressed_bytes "
                f"({self.limits.max_uncompressed_bytes} bytes)",
            )
        if total > self.ratio_cap:
            raise _too_large(
                "upload_max_ratio",
                self.limits.max_ratio,
                f"the archive {what} more than upload_max_ratio ({self.limits.max_ratio:g}) times its "
                "compressed size (a decompression bomb?)",
            )


def _copy(source: IO[bytes], target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                break
            budget.add(len(chunk))
            out.write(chunk)


def _extract_zip(path: Path, dest: Path, limits: ArchiveLimits, budget: _Budget) -> int:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"the zip archive is corrupt: {exc}") from exc
    with archive:
        try:
            infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError) as exc:
            raise ArchiveError(f"the zip archive is corrupt: {exc}") from exc
        _check_count(len(infos), limits)
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in infos:
            rel = _member_path(info.filename)
            # Unix file type bits (zips made on Windows, or by writestr, carry none: a plain file).
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"archive member {info.filename!r} is a link or special file; not allowed")
            if rel is None or info.is_dir():
                continue
            plan.append((info, rel))
        budget.check_declared(sum(info.file_size for info, _ in plan))
        for info, rel in plan:
            try:
                with archive.open(info) as source:
                    _copy(source, _target(dest, rel), budget)
            except FileExistsError as exc:
                raise ArchiveError(f"archive member {info.filename!r} appears twice") from exc
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
                raise ArchiveError(f"archive member {info.filename!r} is corrupt: {exc}") from exc
        return len(plan)


def _extract_tar(path: Path, dest: Path, limits: ArchiveLimits, budget: _Budget) -> int:
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"the tar archive is corrupt: {exc}") from exc
    with archive:
        # Read member headers one at a time so a huge member count is refused before it fills memory.
        plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        count = 0
        try:
            for info in archive:
                count += 1
                _check_count(count, limits)
                rel = _member_path(info.name)
                if info.issym() or info.islnk():
                    raise ArchiveError(f"archive member {info.name!r} is a link; links are not allowed")
                if not (info.isreg() or info.isdir()):
                    raise ArchiveError(f"archive member {info.name!r} is a special file; not allowed")
                if rel is None or info.isdir():
                    continue
                plan.append((info, rel))
        except (tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError) as exc:
            raise ArchiveError(f"the tar archive is corrupt: {exc}") from exc
        budget.check_declared(sum(info.size for info, _ in plan))
        for info, rel in plan:
            try:
                source = archive.extractfile(info)
                if source is None:
                    raise ArchiveError(f"archive member {info.name!r} cannot be read")
                with source:
                    _copy(source, _target(dest, rel), budget)
            except FileExistsError as exc:
                raise ArchiveError(f"archive member {info.name!r} appears twice") from exc
            except (tarfile.TarError, zlib.error, lzma.LZMAError, EOFError) as exc:
                raise ArchiveError(f"archive member {info.name!r} is corrupt: {exc}") from exc
            except OSError as exc:
                if exc.errno:
                    raise  # a real I/O problem on our side (disk full), not the archive's fault
                raise ArchiveError(f"archive member {info.name!r} is corrupt: {exc}") from exc
        return len(plan)


def _check_count(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise _limit_error(
            "upload_max_members",
            limits.max_members,
            f"the archive has more than upload_max_members ({limits.max_members}) entries",
        )


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> Extracted:
    """Extract `path` (zip or tar) into the new folder `dest`, enforcing `limits`.

    Raises `ArchiveTooLarge` (413) or `ArchiveError` (422), naming the limit in `details`; on any
    error `dest` is removed again, so a refused upload leaves nothing behind.
    """
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise _too_large(
            "upload_max_bytes",
            limits.max_bytes,
            f"the upload is larger than upload_max_bytes ({limits.max_bytes})",
        )
    kind = archive_kind(path)
    dest.mkdir(parents=True, exist_ok=False)
    dest = dest.resolve()
    budget = _Budget(limits, size)
    try:
        files = (_extract_zip if kind == "zip" else _extract_tar)(path, dest, limits, budget)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("the archive holds no files")
    return Extracted(files=files, bytes=budget.written)
