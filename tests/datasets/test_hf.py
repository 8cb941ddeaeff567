"""Hugging Face `datasets` detection datasets: conversion, the per-dataset image cache, every problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from app.datasets.coco import prepare_coco_dataset, resolve_coco_splits
from app.datasets.demo import write_shapes_dataset, write_shapes_hf
from app.datasets.formats import DatasetOptions, detect_format, validate_dataset
from app.datasets.hf import MANIFEST, prepare_hf_dataset
from app.errors import DatasetError
from app.paths import DATASET_CACHE_FOLDER
from tests.datasets.conftest import SMALL_SPEC
from tests.support import ANNOTATION_MAX_BYTES

TRAIN_FILE = "data/train-00000-of-00001.parquet"


@pytest.fixture
def hf_root(tmp_path: Path) -> Path:
    return write_shapes_hf(tmp_path / "hf", SMALL_SPEC)


def prepare(root: Path, out_dir: Path, **kwargs: Any) -> Any:
    options = {"bbox_format": "xywh", "train_split": None, "val_split": None}
    options.update(kwargs)
    return prepare_hf_dataset(
        root,
        out_dir=out_dir,
        cache_root=root / DATASET_CACHE_FOLDER,
        annotation_max_bytes=ANNOTATION_MAX_BYTES,
        **options,
    )


def errors_of(root: Path, out_dir: Path, **kwargs: Any) -> list[dict[str, str]]:
    with pytest.raises(DatasetError) as info:
        prepare(root, out_dir, **kwargs)
    assert not (out_dir / "train.json").exists()
    return [d for d in info.value.details if d["severity"] == "error"]


def rewrite_train(root: Path, change: Any) -> None:
    """Edit the training parquet's rows in Python, keeping its HF features (even where values break them)."""
    path = root / TRAIN_FILE
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)


def test_same_data_as_coco(hf_root: Path, tmp_path: Path) -> None:
    coco_root = write_shapes_dataset(tmp_path / "coco", SMALL_SPEC)
    coco = prepare_coco_dataset(
        coco_root,
        *resolve_coco_splits(coco_root, None, None),
        tmp_path / "c",
        annotation_max_bytes=ANNOTATION_MAX_BYTES,
    )
    hf = prepare(hf_root, tmp_path / "h")
    assert hf.class_names == coco.class_names == ("circle", "square", "triangle")
    assert hf.warnings == []
    for split in ("train", "val"):
        assert hf.stats[split].to_dict() == coco.stats[split].to_dict()
    a = json.loads(coco.train.annotation_file.read_text())["annotations"]
    b = json.loads(hf.train.annotation_file.read_text())["annotations"]
    assert [x["bbox"] for x in a] == [y["bbox"] for y in b]


@pytest.mark.parametrize("bbox_format", ["xyxy", "cxcywh"])
def test_bbox_formats_give_the_same_boxes(tmp_path: Path, bbox_format: str) -> None:
    reference = prepare(write_shapes_hf(tmp_path / "ref", SMALL_SPEC), tmp_path / "r")
    root = write_shapes_hf(tmp_path / "other", SMALL_SPEC, bbox_format=bbox_format)
    other = prepare(root, tmp_path / "o", bbox_format=bbox_format)
    ref = json.loads(reference.train.annotation_file.read_text())["annotations"]
    got = json.loads(other.train.annotation_file.read_text())["annotations"]
    flat = [v for x in got for v in x["bbox"]]
    assert flat == pytest.approx([v for x in ref for v in x["bbox"]])


def test_wrong_bbox_format_is_reported(tmp_path: Path) -> None:
    root = write_shapes_hf(tmp_path / "xyxy", SMALL_SPEC, bbox_format="xyxy")
    details = errors_of(root, tmp_path / "out", bbox_format="cxcywh")
    assert any("check bbox_format" in d["problem"] for d in details)


def test_images_are_decoded_once_per_dataset_version(hf_root: Path, tmp_path: Path) -> None:
    first = prepare(hf_root, tmp_path / "job1")
    images_dir = first.train.images_dir
    assert images_dir.is_relative_to(hf_root / DATASET_CACHE_FOLDER)
    manifest = images_dir / MANIFEST
    stamp = manifest.stat().st_mtime_ns
    second = prepare(hf_root, tmp_path / "job2")
    assert second.train.images_dir == images_dir and manifest.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in images_dir.iterdir() if p.name != MANIFEST)[0] == "0000000.jpg"
    # A changed dataset gets a new cache; the old one is removed.
    rewrite_train(hf_root, lambda rows: rows.pop())
    third = prepare(hf_root, tmp_path / "job3")
    assert third.train.images_dir != images_dir and not images_dir.exists()
    assert third.stats["train"].images == 5


def test_a_cache_naming_files_outside_its_folder_is_rebuilt(hf_root: Path, tmp_path: Path) -> None:
    images_dir = prepare(hf_root, tmp_path / "job1").train.images_dir
    manifest = json.loads((images_dir / MANIFEST).read_text())
    manifest["rows"][0]["file"] = "../../../../secret.jpg"
    (images_dir / MANIFEST).write_text(json.dumps(manifest))
    assert prepare(hf_root, tmp_path / "job2").train.images_dir == images_dir
    assert json.loads((images_dir / MANIFEST).read_text())["rows"][0]["file"] == "0000000.jpg"


def test_named_splits_and_missing_split(hf_root: Path, tmp_path: Path) -> None:
    prepared = prepare(hf_root, tmp_path / "a", train_split="validation", val_split="train")
    assert prepared.stats["train"].images == 3
    with pytest.raises(DatasetError, match="no split 'holdout'"):
        prepare(hf_root, tmp_path / "b", val_split="holdout")


def test_save_to_disk_folder_works(hf_root: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    loaded = load_dataset(str(hf_root), cache_dir=str(tmp_path / "c"))
    loaded.save_to_disk(str(tmp_path / "disk"))
    assert detect_format(tmp_path / "disk")[0] == "hf"
    assert prepare(tmp_path / "disk", tmp_path / "out").class_names == ("circle", "square", "triangle")


def test_detected_as_hf(hf_root: Path) -> None:
    assert detect_format(hf_root) == ("hf", hf_root)


# --------------------------------------------------------------------------------------------------
# Problems, each reported with where it is
# --------------------------------------------------------------------------------------------------


def test_unknown_class_id(hf_root: Path, tmp_path: Path) -> None:
    def change(rows: list[dict[str, Any]]) -> None:
        rows[1]["objects"]["category"][0] = 7

    rewrite_train(hf_root, change)
    (detail,) = errors_of(hf_root, tmp_path / "out")
    assert detail["file"] == "train split row 1 (image_id 1)"
    assert "category 7, which is not a class" in detail["problem"]


def test_duplicate_image_ids(hf_root: Path, tmp_path: Path) -> None:
    def change(rows: list[dict[str, Any]]) -> None:
        rows[2]["image_id"] = rows[0]["image_id"]

    rewrite_train(hf_root, change)
    (detail,) = errors_of(hf_root, tmp_path / "out")
    assert detail["file"].startswith("train split row 2") and "appears twice" in detail["problem"]


def test_missing_and_unreadable_images(hf_root: Path, tmp_path: Path) -> None:
    def change(rows: list[dict[str, Any]]) -> None:
        rows[0]["image"] = None
        rows[3]["image"] = {"bytes": b"garbage" * 20, "path": None}

    rewrite_train(hf_root, change)
    details = errors_of(hf_root, tmp_path / "out")
    assert [d["file"] for d in details] == [
        "train split row 0 (image_id 0)",
        "train split row 3 (image_id 3)",
    ]
    assert "no image" in details[0]["problem"] and "not a readable image" in details[1]["problem"]


def test_boxes_outside_or_without_area_are_warnings(hf_root: Path, tmp_path: Path) -> None:
    def change(rows: list[dict[str, Any]]) -> None:
        rows[0]["objects"]["bbox"][0] = [-10.0, -10.0, 30.0, 30.0]
        rows[1]["objects"]["bbox"][0] = [5.0, 5.0, 0.0, 10.0]
        rows[2]["width"] = 999

    rewrite_train(hf_root, change)
    prepared = prepare(hf_root, tmp_path / "out")
    text = " ".join(prepared.warnings)
    assert "1 box extended outside its image and was clipped (e.g. train split row 0" in text
    assert "1 box had zero or negative area" in text and "train split row 1 (image_id 1) box 0" in text
    assert "differs from the file" in text


def test_parquet_that_does_not_parse(hf_root: Path, tmp_path: Path) -> None:
    (hf_root / TRAIN_FILE).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError) as info:
        prepare(hf_root, tmp_path / "out")
    assert "cannot be loaded" in info.value.message or "not readable" in info.value.message


def test_missing_columns(tmp_path: Path) -> None:
    from datasets import Dataset

    root = tmp_path / "plain"
    (root / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        Dataset.from_dict({"text": ["a", "b"]}).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    details = errors_of(root, tmp_path / "out")
    assert any("has no 'image' column" in d["problem"] for d in details)


def test_report_shape(hf_root: Path) -> None:
    def change(rows: list[dict[str, Any]]) -> None:
        rows[1]["objects"]["category"][0] = 7

    rewrite_train(hf_root, change)
    result = validate_dataset(
        hf_root,
        DatasetOptions(format="hf"),
        hf_root / DATASET_CACHE_FOLDER,
        annotation_max_bytes=ANNOTATION_MAX_BYTES,
    )
    assert result["ok"] is False and result["format"] == "hf" and result["errors"] == 1
    assert result["classes"] == ["circle", "square", "triangle"]
    assert result["splits"]["val"]["images"] == 3


def test_api_and_worker_main_process_do_not_import_datasets() -> None:
    code = (
        "import sys, app.main, worker.tasks, worker.train_process\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'pyarrow'))))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == ""
