"""Inputs built to knock the service over (issue 11): each is refused quickly, with a message naming the
limit, before it is expanded. The bombs are generated here, tiny on disk, and fed to the real code:
the archive extractor, the format loaders, and (for two of them) the running service over HTTP."""

from __future__ import annotations

import bz2
import functools
import io
import os
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.datasets.archive import ArchiveError, ArchiveLimits, ArchiveTooLarge, extract_archive
from app.datasets.coco import prepare_coco_dataset, resolve_coco_splits
from app.datasets.demo import write_shapes_hf, write_shapes_yolo
from app.datasets.formats import DatasetOptions, check_layout, validate_dataset
from app.datasets.safe_yaml import MAX_YAML_BYTES
from app.errors import DatasetError
from app.paths import DATASET_CACHE_FOLDER
from app.settings import Settings
from tests.datasets.conftest import SMALL_SPEC
from tests.support import ANNOTATION_MAX_BYTES, Service

# What the issue asks of every refusal.
MAX_SECONDS = 5.0
MAX_RSS_GROWTH = 200 * 2**20
# The service's own defaults: a bomb must be refused by the limits as they ship.
DEFAULTS = Settings()
DEFAULT_LIMITS = ArchiveLimits(
    max_bytes=DEFAULTS.upload_max_bytes,
    max_uncompressed_bytes=DEFAULTS.upload_max_uncompressed_bytes,
    max_members=DEFAULTS.upload_max_members,
    max_ratio=DEFAULTS.upload_max_ratio,
)
ZEROS_BLOCK = 8 * 2**20


# --------------------------------------------------------------------------------------------------
# Bomb builders
# --------------------------------------------------------------------------------------------------


def billion_laughs(levels: int = 12, width: int = 9) -> str:
    """A YAML document of ~600 bytes whose aliases stand for width**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines.append(f"names: *l{levels - 1}")
    lines.append("train: images/train")
    lines.append("val: images/val")
    return "\n".join(lines) + "\n"


@functools.cache
def bz2_zeros_block() -> bytes:
    return bz2.compress(bytes(ZEROS_BLOCK), 9)


def bz2_zeros(size: int) -> bytes:
    """`size` zero bytes (a multiple of 8 MiB) as concatenated bz2 streams: ~6 bytes per MiB."""
    assert size % ZEROS_BLOCK == 0
    return bz2_zeros_block() * (size // ZEROS_BLOCK)


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(tarfile.GNU_FORMAT)


def tar_bz2_of_zeros(path: Path, members: int, member_size: int) -> Path:
    """A .tar.bz2 of `members` files of `member_size` real zero bytes each (no lying sizes)."""
    parts = []
    for index in range(members):
        parts.append(bz2.compress(tar_header(f"ds/zeros-{index}.bin", member_size)))
        parts.append(bz2_zeros(member_size))
    parts.append(bz2.compress(bytes(2 * tarfile.BLOCKSIZE)))
    path.write_bytes(b"".join(parts))
    return path


def tar_bz2_of_pax_headers(path: Path, headers: int, header_size: int) -> Path:
    """A .tar.bz2 of `headers` empty files, each after a pax header of `header_size` bytes: listing
    it (no member has data) decompresses headers * header_size bytes."""
    prefix = b" comment="
    digits = len(str(header_size))
    record = str(header_size).encode() + prefix + b"x" * (header_size - digits - len(prefix) - 1) + b"\n"
    assert len(record) == header_size
    padding = -header_size % tarfile.BLOCKSIZE
    unit = b"".join(
        (
            tar_header("././@PaxHeader", header_size, tarfile.XHDTYPE),
            record + bytes(padding),
            tar_header("ds/empty.txt", 0),
        )
    )
    stream = bz2.compress(unit, 9)
    path.write_bytes(stream * headers + bz2.compress(bytes(2 * tarfile.BLOCKSIZE)))
    return path


def zip_claiming(path: Path, entries: int, directory_size: int) -> Path:
    """A small valid zip whose end record claims `entries` entries in a directory of `directory_size`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ds/a.txt", b"a")
    data = bytearray(path.read_bytes())
    at = data.rindex(b"PK\x05\x06")
    data[at + 8 : at + 12] = (min(entries, 0xFFFF).to_bytes(2, "little")) * 2
    data[at + 12 : at + 16] = min(directory_size, 0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def zip64_claiming(path: Path, entries: int, directory_size: int | None = None) -> Path:
    """A small valid zip given zip64 end records (as for more than 65535 entries) claiming `entries`
    entries in a directory of `directory_size` bytes (default: the true size)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ds/a.txt", b"a")
    data = path.read_bytes()
    at = data.rindex(b"PK\x05\x06")
    true_size, offset = struct.unpack_from("<2L", data, at + 12)
    zip64_end = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
        true_size if directory_size is None else directory_size, offset,
    )  # fmt: skip
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(data[:at] + zip64_end + locator + end)
    return path


def zip_of_many(path: Path, count: int, *, claim: int | None = None) -> Path:
    """A zip of `count` empty entries; its end record says `claim` entries when given (a lie)."""
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            archive.writestr(f"{index}", b"")
    if claim is not None:
        data = bytearray(path.read_bytes())
        at = data.rindex(b"PK\x05\x06")
        data[at + 8 : at + 12] = claim.to_bytes(2, "little") * 2
        path.write_bytes(bytes(data))
    return path


def sparse_file(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of `size` bytes that takes (almost) no disk: `head`, then a hole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


@contextmanager
def quick_and_small() -> Iterator[None]:
    """The block runs in under MAX_SECONDS and this process's RSS never grows by MAX_RSS_GROWTH
    (sampled every few milliseconds from another thread: a peak that is freed again still counts)."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
    assert peak - before < MAX_RSS_GROWTH, f"RSS grew by {(peak - before) / 2**20:.0f} MiB"


def codes(report: dict[str, Any]) -> set[str]:
    return {p["code"] for p in report["problems"] if p["severity"] == "error"}


def problem_texts(report: dict[str, Any]) -> str:
    return " ".join(p["problem"] for p in report["problems"])


# --------------------------------------------------------------------------------------------------
# YAML: data.yaml and the dataset card
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    return write_shapes_yolo(tmp_path / "yolo", SMALL_SPEC)


def test_billion_laughs_data_yaml_is_a_problem(yolo_root: Path) -> None:
    (yolo_root / "data.yaml").write_text(billion_laughs())
    with quick_and_small():
        report = validate_dataset(
            yolo_root,
            DatasetOptions(format="yolo"),
            yolo_root / ".cache",
            annotation_max_bytes=ANNOTATION_MAX_BYTES,
        )
        # The check POST /jobs makes, too.
        with pytest.raises(DatasetError) as info:
            check_layout(yolo_root, DatasetOptions(format="yolo"))
    assert codes(report) == {"yaml_too_complex"}
    assert "MAX_YAML_ALIAS_NODES" in problem_texts(report)
    assert report["problems"][0]["file"] == "data.yaml"
    assert info.value.status_code == 422 and "MAX_YAML_ALIAS_NODES" in info.value.message


def test_recursive_deep_and_oversized_data_yaml(yolo_root: Path) -> None:
    (yolo_root / "data.yaml").write_text("names: &n [a, *n]\ntrain: images/train\nval: images/val\n")
    with pytest.raises(DatasetError, match="recursive alias"):
        check_layout(yolo_root, DatasetOptions(format="yolo"))
    (yolo_root / "data.yaml").write_text("names: " + "[" * 100_000)
    with pytest.raises(DatasetError, match="too deeply") as info:
        check_layout(yolo_root, DatasetOptions(format="yolo"))
    assert info.value.details[0]["code"] == "yaml_too_complex"
    sparse_file(yolo_root / "data.yaml", 64 * 2**30, b"names: [a]\n")
    with quick_and_small(), pytest.raises(DatasetError) as info:
        check_layout(yolo_root, DatasetOptions(format="yolo"))
    assert info.value.details[0]["code"] == "file_too_large"
    assert "MAX_YAML_BYTES" in info.value.message and str(MAX_YAML_BYTES) in info.value.message


def test_a_few_plain_aliases_still_load(yolo_root: Path) -> None:
    (yolo_root / "data.yaml").write_text(
        "path: .\nshapes: &shapes [circle, square, triangle]\nnames: *shapes\n"
        "train: &train images/train\nval: images/val\ntest: *train\n"
    )
    check_layout(yolo_root, DatasetOptions(format="yolo"))


@pytest.fixture
def hf_root(tmp_path: Path) -> Path:
    return write_shapes_hf(tmp_path / "hf", SMALL_SPEC)


def hf_report(root: Path, annotation_max_bytes: int = ANNOTATION_MAX_BYTES) -> dict[str, Any]:
    return validate_dataset(
        root,
        DatasetOptions(format="hf"),
        root / DATASET_CACHE_FOLDER,
        annotation_max_bytes=annotation_max_bytes,
    )


def test_billion_laughs_dataset_card_is_a_problem(hf_root: Path) -> None:
    (hf_root / "README.md").write_text(f"---\n{billion_laughs()}---\n# Shapes\n")
    with quick_and_small():
        report = hf_report(hf_root)
    assert codes(report) == {"yaml_too_complex"}
    assert report["problems"][0]["file"] == "README.md"
    (hf_root / "README.md").unlink()
    (hf_root / ".huggingface.yaml").write_text(billion_laughs())
    assert codes(hf_report(hf_root)) == {"yaml_too_complex"}


@pytest.mark.parametrize(
    ("pattern", "code"),
    [
        ("../outside/*.parquet", "outside_dataset"),
        ("/etc/*.parquet", "outside_dataset"),
        ("https://example.com/train.parquet", "remote_data_files"),
        ("hf://datasets/someone/shapes/train.parquet", "remote_data_files"),
        ("s3://bucket/train.parquet", "remote_data_files"),
        ("zip://train.parquet::https://example.com/a.zip", "remote_data_files"),
    ],
)
def test_card_data_files_stay_in_the_dataset(hf_root: Path, pattern: str, code: str) -> None:
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n"
        f"  - split: validation\n    path: '{pattern}'\n---\n"
    )
    (hf_root / "README.md").write_text(card)
    report = hf_report(hf_root)
    assert codes(report) == {code}
    assert pattern in problem_texts(report)


def test_card_data_dir_outside_and_link_out(hf_root: Path, tmp_path: Path) -> None:
    (hf_root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_dir: ../elsewhere\n---\n"
    )
    assert codes(hf_report(hf_root)) == {"outside_dataset"}
    (tmp_path / "elsewhere").mkdir()
    (hf_root / "out").symlink_to(tmp_path / "elsewhere")
    (hf_root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: {train: out/*.parquet}\n---\n"
    )
    assert codes(hf_report(hf_root)) == {"outside_dataset"}


def test_card_with_files_inside_is_fine(hf_root: Path) -> None:
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n"
        "  - split: validation\n    path: data/validation-*.parquet\n"
        "---\n# Shapes\n"
    )
    (hf_root / "README.md").write_text(card)
    assert hf_report(hf_root)["ok"], hf_report(hf_root)["problems"]


def test_datasets_is_forced_offline(hf_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert hf_report(hf_root)["ok"]
    import datasets
    import huggingface_hub.constants

    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.is_offline_mode()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------------------------------
# Annotation files larger than annotation_max_bytes
# --------------------------------------------------------------------------------------------------


def test_huge_coco_json_is_refused_unread(shapes_root: Path, out_dir: Path) -> None:
    # Sparse: a 2 GiB annotation file that json.load would read whole (and fail on, much later).
    sparse_file(shapes_root / "train/_annotations.coco.json", 2 * 2**30, b'{"images": [')
    train, val = resolve_coco_splits(shapes_root, None, None)
    with quick_and_small(), pytest.raises(DatasetError) as info:
        prepare_coco_dataset(shapes_root, train, val, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES)
    [problem] = [d for d in info.value.details if d["code"] == "file_too_large"]
    assert problem["file"] == "train/_annotations.coco.json"
    assert "annotation_max_bytes" in problem["problem"] and str(ANNOTATION_MAX_BYTES) in problem["problem"]


def test_annotation_limit_is_the_setting(shapes_root: Path, out_dir: Path) -> None:
    train, val = resolve_coco_splits(shapes_root, None, None)
    size = (shapes_root / train.annotations).stat().st_size
    prepare_coco_dataset(shapes_root, train, val, out_dir, annotation_max_bytes=size)
    with pytest.raises(DatasetError, match="annotation_max_bytes"):
        prepare_coco_dataset(shapes_root, train, val, out_dir, annotation_max_bytes=size - 1)


def test_huge_hf_metadata_is_refused_unread(hf_root: Path) -> None:
    sparse_file(hf_root / "data/metadata.jsonl", 2 * 2**30, b'{"file_name": "a.jpg"}\n')
    with quick_and_small():
        report = hf_report(hf_root)
    assert codes(report) == {"file_too_large"}
    [problem] = report["problems"]
    assert problem["file"] == "data/metadata.jsonl" and "annotation_max_bytes" in problem["problem"]


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------


def refusal(path: Path, dest: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> ArchiveError | ArchiveTooLarge:
    with quick_and_small(), pytest.raises((ArchiveError, ArchiveTooLarge)) as info:
        extract_archive(path, dest, limits)
    assert not dest.exists()
    assert isinstance(info.value, (ArchiveError, ArchiveTooLarge))
    return info.value


def test_tar_bz2_with_a_huge_member_stops_at_its_header(tmp_path: Path) -> None:
    path = tar_bz2_of_zeros(tmp_path / "bomb.tar.bz2", members=1, member_size=4 * 2**30)
    assert path.stat().st_size < 50_000
    error = refusal(path, tmp_path / "out")
    assert error.status_code == 413 and error.details[0]["limit"] == "upload_max_ratio"
    assert "upload_max_ratio" in error.message


def test_tar_bz2_of_many_large_members(tmp_path: Path) -> None:
    # 64 members of 64 MiB: each is under the limit, together they are 4 GiB.
    path = tar_bz2_of_zeros(tmp_path / "bomb.tar.bz2", members=64, member_size=64 * 2**20)
    loose = ArchiveLimits(
        max_bytes=2**30, max_uncompressed_bytes=100 * 2**20, max_members=1000, max_ratio=1e9
    )
    error = refusal(path, tmp_path / "out", loose)
    assert error.status_code == 413 and error.details[0]["limit"] == "upload_max_uncompressed_bytes"


def test_tar_listing_of_pax_headers_is_counted(tmp_path: Path) -> None:
    # 1024 headers of 4 MiB: listing alone would decompress 4 GiB; no member declares a byte.
    path = tar_bz2_of_pax_headers(tmp_path / "pax.tar.bz2", headers=1024, header_size=4 * 2**20)
    assert path.stat().st_size < 200_000
    error = refusal(path, tmp_path / "out")
    assert error.status_code == 413 and error.details[0]["limit"] == "upload_max_ratio"


def test_tar_with_a_giant_pax_header(tmp_path: Path) -> None:
    path = tar_bz2_of_pax_headers(tmp_path / "pax.tar.bz2", headers=1, header_size=64 * 2**20)
    error = refusal(path, tmp_path / "out")
    assert error.status_code == 422 and error.details[0]["limit"] == "MAX_TAR_HEADER_READ"


def test_tar_with_a_run_of_pax_headers_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    header = tar_header("././@PaxHeader", 13, tarfile.XHDTYPE) + b"13 comment=x\n" + bytes(499)
    path = tmp_path / "run.tar"
    path.write_bytes(header * 5000 + bytes(1024))
    error = refusal(path, tmp_path / "out")
    assert error.status_code == 422 and "pax" in error.message


def test_zip_end_record_claiming_too_many_entries(tmp_path: Path) -> None:
    path = zip_claiming(tmp_path / "claims.zip", entries=0xFFFF, directory_size=40)
    small = ArchiveLimits(max_bytes=2**20, max_uncompressed_bytes=2**20, max_members=50, max_ratio=200)
    error = refusal(path, tmp_path / "out", small)
    assert error.status_code == 422 and error.details[0]["limit"] == "upload_max_members"


def test_zip_central_directory_far_beyond_the_members_limit(tmp_path: Path) -> None:
    path = zip_claiming(tmp_path / "huge-cd.zip", entries=1, directory_size=0xFFFF0000)
    error = refusal(path, tmp_path / "out")
    assert error.details[0]["limit"] == "upload_max_members" and "central directory" in error.message


def test_zip64_end_records_are_checked_too(tmp_path: Path) -> None:
    honest = zip64_claiming(tmp_path / "honest.zip", entries=1)
    assert extract_archive(honest, tmp_path / "honest", DEFAULT_LIMITS).files == 1
    many = zip64_claiming(tmp_path / "many.zip", entries=10**12)
    assert refusal(many, tmp_path / "out").details[0]["limit"] == "upload_max_members"
    huge = zip64_claiming(tmp_path / "huge.zip", entries=1, directory_size=2**40)
    error = refusal(huge, tmp_path / "out")
    assert error.details[0]["limit"] == "upload_max_members" and "central directory" in error.message


def test_zip_whose_end_record_lies_about_its_entries(tmp_path: Path) -> None:
    path = zip_of_many(tmp_path / "liar.zip", 2000, claim=1)
    small = ArchiveLimits(max_bytes=2**20, max_uncompressed_bytes=2**20, max_members=50, max_ratio=200)
    error = refusal(path, tmp_path / "out", small)
    assert error.details[0]["limit"] == "upload_max_members"


# --------------------------------------------------------------------------------------------------
# Through the running service
# --------------------------------------------------------------------------------------------------


def tar_gz_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


@pytest.mark.backends("sqlite")
def test_tar_bomb_upload_is_413(service: Service, tmp_path: Path) -> None:
    bomb = tar_bz2_of_zeros(tmp_path / "bomb.tar.bz2", members=4, member_size=2 * 2**30).read_bytes()
    start = time.monotonic()
    response = service.client.post(
        "/datasets", content=bomb, headers={"content-type": "application/x-bzip2"}, timeout=60
    )
    assert time.monotonic() - start < MAX_SECONDS
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["code"] == "archive_too_large" and body["limits"][0]["limit"] == "upload_max_ratio"
    assert "upload_max_ratio" in body["detail"]


@pytest.mark.backends("sqlite")
def test_yaml_bomb_upload_is_reported_by_validate(service: Service, tmp_path: Path) -> None:
    folder = write_shapes_yolo(tmp_path / "yolo", SMALL_SPEC)
    (folder / "data.yaml").write_text(billion_laughs())
    start = time.monotonic()
    response = service.client.post(
        "/datasets", content=tar_gz_of(folder), headers={"content-type": "application/gzip"}, timeout=60
    )
    assert time.monotonic() - start < MAX_SECONDS
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "invalid" and codes(dataset["report"]) == {"yaml_too_complex"}
    start = time.monotonic()
    report = service.client.post(f"/datasets/{dataset['id']}/validate").json()
    assert time.monotonic() - start < MAX_SECONDS
    assert codes(report) == {"yaml_too_complex"} and "MAX_YAML_ALIAS_NODES" in problem_texts(report)
