"""Safe extraction of uploaded dataset archives (zip, tar, tar.gz/bz2/xz).

An upload is untrusted: every member is checked before anything is written, and the bytes actually
written are counted again while extracting (a zip's declared sizes can lie). Nothing may land outside
the destination folder (zip slip), links and device files are refused, and the limits from the
settings (compressed size, uncompressed size, member count, compression ratio) answer 413 (sizes)
or 422 (everything else) naming the limit. Pure standard library.

Planning must not be the bomb either: a compressed tar is decompressed through a counter that refuses
to go past the limits before the decompressor produces the bytes (listing a tar skips over every
member's data, and tarfile reads a pax or GNU long-name header whole), and a zip's central directory
is sized and counted from its end record before zipfile parses it into memory.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from app.errors import InvalidInput, PayloadTooLarge, broken_limit
from app.paths import DATASET_CACHE_FOLDER, resolve_inside

CHUNK = 1 << 20
# tarfile reads member data in the chunks `_copy` asks for; only a pax or GNU long-name header is read
# whole, in one call. Such a header holds a name and a few attributes: past this it is an attack.
MAX_TAR_HEADER_READ = 8 * CHUNK
# A zip's central directory record is 46 bytes plus its name, extra field and comment: far less than
# this for anything an archiver writes, so a directory larger than this per allowed member is refused.
MAX_ZIP_RECORD_BYTES = 8 * 1024
# tarfile's "r:*" opens these; recognised by their magic bytes.
_COMPRESSED_TAR: tuple[tuple[bytes, Any], ...] = (
    (b"\x1f\x8b", gzip.GzipFile),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_TOO_MANY_EXTENDED_HEADERS = "the tar archive is corrupt: too many pax or long-name headers in a row"
_ZIP_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP_RECORD = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header (46 bytes)
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
    return ArchiveTooLarge(message, details=broken_limit(limit, value))


def _limit_error(limit: str, value: float, message: str) -> ArchiveError:
    return ArchiveError(message, details=broken_limit(limit, value))


def archive_kind(path: Path) -> str:
    """'zip' or 'tar', from the magic bytes (the client's file name and content type are not trusted).

    A compressed file counts as a tar until it is opened: `tarfile.is_tarfile` would decompress (and
    read a first header of any size) without the limits.
    """
    if zipfile.is_zipfile(path):
        return "zip"
    with path.open("rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    if any(head.startswith(magic) for magic, _ in _COMPRESSED_TAR):
        return "tar"
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        return "tar"
    except tarfile.TarError:
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
    if DATASET_CACHE_FOLDER in path.parts:  # the service's own cache: a planted one would be trusted
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

    def check_stream(self, position: int) -> None:
        """Before a decompressed tar stream is read or skipped up to `position` (headers included)."""
        self._check(position, declared=False)

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


class _BoundedStream:
    """The decompressed tar stream, for tarfile: every read and seek is checked against the budget
    before the decompressor runs, so planning stops at the limit instead of after gigabytes.

    The position is what is checked, not the work: reading the plan's members after the listing
    seeks back once, so the stream is decompressed at most about twice.
    """

    def __init__(self, raw: IO[bytes], budget: _Budget) -> None:
        self._raw = raw
        self._budget = budget
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_TAR_HEADER_READ:
            raise _limit_error(
                "MAX_TAR_HEADER_READ",
                MAX_TAR_HEADER_READ,
                f"the tar archive has a header (pax or GNU long name) larger than {MAX_TAR_HEADER_READ} "
                "bytes (MAX_TAR_HEADER_READ); it is not a dataset archive",
            )
        self._budget.check_stream(self._position + size)
        data = self._raw.read(size)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset + (self._position if whence == 1 else 0)
        if whence not in (0, 1):
            raise OSError("a tar stream cannot be sought from its end")
        self._budget.check_stream(target)
        self._position = self._raw.seek(target)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._raw.close()


def _open_tar(path: Path, budget: _Budget) -> tarfile.TarFile:
    """The tar archive read through `_BoundedStream` (also a plain one: its headers are bounded too)."""
    with path.open("rb") as f:
        head = f.read(8)
    opener = next((o for magic, o in _COMPRESSED_TAR if head.startswith(magic)), None)
    raw: IO[bytes] = opener(path, "rb") if opener is not None else path.open("rb")
    try:
        return tarfile.open(fileobj=_BoundedStream(raw, budget), mode="r:")  # type: ignore[call-overload]
    except BaseException:
        raw.close()
        raise


def _check_zip_directory(path: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip whose central directory lists more than upload_max_members entries, from its end
    record and a walk over the records' fixed headers, before zipfile reads it all into memory."""
    size = path.stat().st_size
    with path.open("rb", buffering=CHUNK) as f:
        tail_start = max(0, size - _ZIP_END.size - 0xFFFF)
        f.seek(tail_start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _ZIP_END.size:
            return  # zipfile reports it
        end_offset = tail_start + at
        *_, entries, directory_size, _, _ = _ZIP_END.unpack_from(tail, at)
        start = end_offset - directory_size
        locator_at = at - _ZIP64_LOCATOR.size
        if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
            # zipfile takes the zip64 end record as the one right before the locator, as here.
            f.seek(end_offset - _ZIP64_LOCATOR.size - _ZIP64_END.size)
            record = f.read(_ZIP64_END.size)
            if len(record) == _ZIP64_END.size and record[:4] == b"PK\x06\x06":
                *_, entries, directory_size, _ = _ZIP64_END.unpack(record)
                start = end_offset - _ZIP64_LOCATOR.size - _ZIP64_END.size - directory_size
        _check_count(entries, limits)
        if directory_size > limits.max_members * MAX_ZIP_RECORD_BYTES:
            raise _limit_error(
                "upload_max_members",
                limits.max_members,
                f"the zip archive's central directory is {directory_size} bytes, too large for "
                f"upload_max_members ({limits.max_members}) entries",
            )
        # The end record's count can lie (zipfile reads records until the directory's size is used).
        if start < 0:
            return
        f.seek(start)
        used = count = 0
        while used < directory_size:
            header = f.read(_ZIP_RECORD.size)
            if len(header) < _ZIP_RECORD.size or header[:4] != b"PK\x01\x02":
                return  # zipfile reports the corruption
            fields = _ZIP_RECORD.unpack(header)
            variable = fields[12] + fields[13] + fields[14]  # name, extra field and comment lengths
            f.seek(variable, 1)
            used += _ZIP_RECORD.size + variable
            count += 1
            _check_count(count, limits)


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
    _check_zip_directory(path, limits)
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
        archive = _open_tar(path, budget)
    except (tarfile.TarError, zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise ArchiveError(f"the tar archive is corrupt: {exc}") from exc
    except RecursionError as exc:  # tarfile reads each pax or long-name header by recursion
        raise ArchiveError(_TOO_MANY_EXTENDED_HEADERS) from exc
    with archive:
        # Read member headers one at a time so a huge member count is refused before it fills memory.
        plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        count = declared = 0
        try:
            for info in archive:
                count += 1
                _check_count(count, limits)
                # Before the next header is read, which skips (decompresses) this member's data.
                declared += info.size
                budget.check_declared(declared)
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
        except RecursionError as exc:
            raise ArchiveError(_TOO_MANY_EXTENDED_HEADERS) from exc
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
