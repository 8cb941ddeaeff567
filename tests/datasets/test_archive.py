"""Safe extraction of uploaded archives: limits, zip slip, links, corrupt files."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from app.datasets.archive import ArchiveError, ArchiveLimits, ArchiveTooLarge, extract_archive
from app.paths import DATASET_CACHE_FOLDER

LIMITS = ArchiveLimits(max_bytes=10 * 2**20, max_uncompressed_bytes=40 * 2**20, max_members=50, max_ratio=200)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def limit_of(error: ArchiveError | ArchiveTooLarge) -> str:
    return str(error.details[0]["limit"])


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extracts_files_and_skips_macos_junk(tmp_path: Path, kind: str) -> None:
    members = {"ds/train/a.txt": b"hello", "ds/b.bin": b"\x00" * 100, "__MACOSX/ds/._a.txt": b"junk"}
    path = (make_zip if kind == "zip" else make_tar)(tmp_path / f"a.{kind}", members)
    result = extract_archive(path, tmp_path / "out", LIMITS)
    assert (result.files, result.bytes) == (2, 105)
    assert (tmp_path / "out/ds/train/a.txt").read_bytes() == b"hello"
    assert not (tmp_path / "out/__MACOSX").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_planted_service_cache_is_not_extracted(tmp_path: Path, kind: str) -> None:
    members = {"ds/train/a.txt": b"hello", f"ds/{DATASET_CACHE_FOLDER}/hf-x/train/manifest.json": b"{}"}
    path = (make_zip if kind == "zip" else make_tar)(tmp_path / f"a.{kind}", members)
    assert extract_archive(path, tmp_path / "out", LIMITS).files == 1
    assert not (tmp_path / "out/ds" / DATASET_CACHE_FOLDER).exists()


@pytest.mark.parametrize("name", ["../evil.txt", "ds/../../evil.txt", "/etc/evil.txt", "C:/evil.txt"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_zip_slip_is_refused_and_nothing_is_left(tmp_path: Path, kind: str, name: str) -> None:
    path = (make_zip if kind == "zip" else make_tar)(tmp_path / f"a.{kind}", {"ok.txt": b"x", name: b"evil"})
    with pytest.raises(ArchiveError) as info:
        extract_archive(path, tmp_path / "sub" / "out", LIMITS)
    assert info.value.status_code == 422
    assert "zip slip" in info.value.message or "outside" in info.value.message
    assert not (tmp_path / "sub" / "out").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" / "evil.txt").exists()


def test_tar_links_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("ds/passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(ArchiveError, match="link"):
        extract_archive(path, tmp_path / "out", LIMITS)
    hard = tmp_path / "hard.tar"
    with tarfile.open(hard, "w") as archive:
        info = tarfile.TarInfo("ds/h")
        info.type = tarfile.LNKTYPE
        info.linkname = "ds/other"
        archive.addfile(info)
    with pytest.raises(ArchiveError, match="link"):
        extract_archive(hard, tmp_path / "out2", LIMITS)


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("ds/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="link"):
        extract_archive(path, tmp_path / "out", LIMITS)


def test_compressed_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.bin", b"x" * 4096)
    small = ArchiveLimits(max_bytes=1024, max_uncompressed_bytes=2**30, max_members=10, max_ratio=1000)
    with pytest.raises(ArchiveTooLarge) as info:
        extract_archive(path, tmp_path / "out", small)
    assert info.value.status_code == 413 and limit_of(info.value) == "upload_max_bytes"


def test_uncompressed_size_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "a.zip", {"a.bin": bytes(range(256)) * 64, "b.bin": bytes(range(256)) * 64})
    small = ArchiveLimits(max_bytes=2**20, max_uncompressed_bytes=20_000, max_members=10, max_ratio=1e9)
    with pytest.raises(ArchiveTooLarge) as info:
        extract_archive(path, tmp_path / "out", small)
    assert limit_of(info.value) == "upload_max_uncompressed_bytes"
    assert "upload_max_uncompressed_bytes" in info.value.message
    assert not (tmp_path / "out").exists()


def test_member_count_limit(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "many.tar.gz", {f"f{i}.txt": b"x" for i in range(60)})
    with pytest.raises(ArchiveError) as info:
        extract_archive(path, tmp_path / "out", LIMITS)
    assert info.value.status_code == 422 and limit_of(info.value) == "upload_max_members"


def test_compression_ratio_limit_stops_a_bomb(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\x00" * (30 * 2**20)})
    assert path.stat().st_size < 100_000
    with pytest.raises(ArchiveTooLarge) as info:
        extract_archive(path, tmp_path / "out", LIMITS)
    assert limit_of(info.value) == "upload_max_ratio"


def test_lying_declared_size_is_caught_while_extracting(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "liar.zip", {"a.bin": bytes(range(256)) * 400})
    data = bytearray(path.read_bytes())
    # Patch the declared uncompressed size (local header and central directory) down to 10 bytes.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + offset : at + offset + 4] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    small = ArchiveLimits(max_bytes=2**20, max_uncompressed_bytes=50_000, max_members=10, max_ratio=1e9)
    with pytest.raises((ArchiveTooLarge, ArchiveError)):
        extract_archive(path, tmp_path / "out", small)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"this is not an archive" * 10, b"PK\x03\x04garbage" * 10])
def test_corrupt_or_unknown_archive(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.zip"
    path.write_bytes(content)
    with pytest.raises(ArchiveError) as info:
        extract_archive(path, tmp_path / "out", LIMITS)
    assert info.value.status_code == 422


def test_truncated_zip_is_corrupt(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "a.zip", {"a.bin": bytes(range(256)) * 100})
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ArchiveError):
        extract_archive(path, tmp_path / "out", LIMITS)


def test_corrupt_member_data(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "a.zip", {"a.bin": bytes(range(256)) * 100})
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("a.bin")
    data[start + 10 : start + 40] = b"\xff" * 30
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(path, tmp_path / "out", LIMITS)


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_every_tar_compression_extracts(tmp_path: Path, mode: str) -> None:
    members = {"ds/a.txt": b"hello", "ds/sub/b.bin": bytes(range(256)) * 100}
    path = make_tar(tmp_path / "a.tar", members, mode)
    result = extract_archive(path, tmp_path / "out", LIMITS)
    assert (result.files, result.bytes) == (2, 5 + 25_600)
    assert (tmp_path / "out/ds/sub/b.bin").read_bytes() == members["ds/sub/b.bin"]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2"])
def test_tar_ratio_bomb_is_refused_while_listing(tmp_path: Path, mode: str) -> None:
    path = make_tar(tmp_path / "bomb.tar", {"zeros.bin": b"\x00" * (30 * 2**20), "b.txt": b"x"}, mode)
    with pytest.raises(ArchiveTooLarge) as info:
        extract_archive(path, tmp_path / "out", LIMITS)
    assert limit_of(info.value) == "upload_max_ratio"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_file_that_is_no_tar(tmp_path: Path, compress: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "notes.gz"
    path.write_bytes(compress(b"just some text, not a tar archive\n" * 100))
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(path, tmp_path / "out", LIMITS)
