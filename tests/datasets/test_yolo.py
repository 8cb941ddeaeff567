"""YOLO (Ultralytics layout) datasets: conversion to the sanitized COCO form and every problem reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from app.datasets.coco import prepare_coco_dataset, resolve_coco_splits
from app.datasets.demo import write_shapes_dataset, write_shapes_yolo
from app.datasets.formats import DatasetOptions, detect_format, validate_dataset
from app.datasets.pipeline import PreparedDataset
from app.datasets.yolo import label_path, load_layout, prepare_yolo_dataset
from app.errors import DatasetError
from tests.datasets.conftest import SMALL_SPEC
from tests.support import ANNOTATION_MAX_BYTES


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    return write_shapes_yolo(tmp_path / "yolo", SMALL_SPEC)


def errors_of(root: Path, out_dir: Path) -> list[dict[str, str]]:
    with pytest.raises(DatasetError) as info:
        prepare_yolo_dataset(root, None, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES)
    assert not (out_dir / "train.json").exists()
    return [d for d in info.value.details if d["severity"] == "error"]


def first_label(root: Path, split: str = "train") -> Path:
    return sorted((root / "labels" / split).glob("*.txt"))[0]


def report(root: Path) -> dict[str, object]:
    return validate_dataset(
        root, DatasetOptions(format="yolo"), root / ".cache", annotation_max_bytes=ANNOTATION_MAX_BYTES
    )


def test_same_data_as_coco(yolo_root: Path, tmp_path: Path) -> None:
    coco_root = write_shapes_dataset(tmp_path / "coco", SMALL_SPEC)
    coco = prepare_coco_dataset(
        coco_root,
        *resolve_coco_splits(coco_root, None, None),
        tmp_path / "c",
        annotation_max_bytes=ANNOTATION_MAX_BYTES,
    )
    yolo: PreparedDataset = prepare_yolo_dataset(
        yolo_root, None, tmp_path / "y", annotation_max_bytes=ANNOTATION_MAX_BYTES
    )
    assert yolo.class_names == coco.class_names == ("circle", "square", "triangle")
    assert yolo.warnings == []
    for split in ("train", "val"):
        assert yolo.stats[split].to_dict() == coco.stats[split].to_dict()
    data = json.loads(yolo.train.annotation_file.read_text())
    assert yolo.train.images_dir == yolo_root.resolve()
    assert all((yolo.train.images_dir / i["file_name"]).is_file() for i in data["images"])
    source = json.loads(coco.train.annotation_file.read_text())
    for a, b in zip(source["annotations"], data["annotations"], strict=True):
        assert a["category_id"] == b["category_id"]
        assert b["bbox"] == pytest.approx(a["bbox"], abs=0.01)


def test_detected_as_yolo(yolo_root: Path) -> None:
    assert detect_format(yolo_root) == ("yolo", yolo_root)


def test_roboflow_export_layout_and_names_mapping(yolo_root: Path, tmp_path: Path) -> None:
    # Roboflow: train/images, train/labels, data.yaml with `../train/images`, names as a mapping.
    for split, target in (("train", "train"), ("val", "valid")):
        (yolo_root / target).mkdir(exist_ok=True)
        shutil.move(yolo_root / "images" / split, yolo_root / target / "images")
        shutil.move(yolo_root / "labels" / split, yolo_root / target / "labels")
    (yolo_root / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "train": "../train/images",
                "val": "../valid/images",
                "nc": 3,
                "names": {0: "circle", 1: "square", 2: "triangle"},
            }
        )
    )
    prepared = prepare_yolo_dataset(
        yolo_root, None, tmp_path / "out", annotation_max_bytes=ANNOTATION_MAX_BYTES
    )
    assert prepared.class_names == ("circle", "square", "triangle")
    assert (prepared.stats["train"].images, prepared.stats["val"].images) == (6, 3)


def test_data_yaml_named_in_the_spec(yolo_root: Path) -> None:
    (yolo_root / "data.yaml").rename(yolo_root / "shapes.yaml")
    (yolo_root / "other.yaml").write_text("x: 1")
    with pytest.raises(DatasetError, match="several YAML files"):
        load_layout(yolo_root, None)
    assert load_layout(yolo_root, "shapes.yaml").class_names == ("circle", "square", "triangle")


def test_label_path_rule() -> None:
    assert label_path(Path("/d/images/train/a.b.jpg")) == Path("/d/labels/train/a.b.txt")
    assert label_path(Path("/d/images/x/images/a.png")) == Path("/d/images/x/labels/a.txt")


def test_clean_report(yolo_root: Path) -> None:
    result = report(yolo_root)
    assert result["ok"] is True and result["errors"] == 0 and result["format"] == "yolo"
    assert result["classes"] == ["circle", "square", "triangle"]
    assert set(result["splits"]) == {"train", "val"}  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Problems, each reported with its file
# --------------------------------------------------------------------------------------------------


def test_data_yaml_that_does_not_parse(yolo_root: Path, tmp_path: Path) -> None:
    (yolo_root / "data.yaml").write_text("names: [circle, square\ntrain: : :")
    details = errors_of(yolo_root, tmp_path / "out")
    assert details[0]["file"] == "data.yaml" and "not valid YAML" in details[0]["problem"]


def test_data_yaml_without_names_or_with_missing_split(yolo_root: Path, tmp_path: Path) -> None:
    (yolo_root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/nope"}))
    with pytest.raises(DatasetError, match="no names"):
        load_layout(yolo_root, None)
    (yolo_root / "data.yaml").write_text(
        yaml.safe_dump({"names": ["a"], "train": "images/train", "val": "images/nope"})
    )
    with pytest.raises(DatasetError, match="'images/nope' is not a folder"):
        load_layout(yolo_root, None)


def test_label_line_that_does_not_parse(yolo_root: Path, tmp_path: Path) -> None:
    label = first_label(yolo_root)
    label.write_text(label.read_text() + "1 0.5 0.5 oops 0.2\n0 0.5 0.5\n")
    details = errors_of(yolo_root, tmp_path / "out")
    rel = label.relative_to(yolo_root).as_posix()
    assert [d["file"] for d in details] == [rel, rel]
    assert "does not parse" in details[0]["problem"] and "expected 5" in details[1]["problem"]


def test_unknown_class_id(yolo_root: Path, tmp_path: Path) -> None:
    label = first_label(yolo_root)
    label.write_text("7 0.5 0.5 0.2 0.2\n")
    (detail,) = errors_of(yolo_root, tmp_path / "out")
    assert detail["file"] == label.relative_to(yolo_root).as_posix()
    assert "class id 7" in detail["problem"] and "0..2" in detail["problem"]


def test_unreadable_and_listed_but_missing_images(yolo_root: Path, tmp_path: Path) -> None:
    victim = sorted((yolo_root / "images" / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not an image" * 10)
    (yolo_root / "val.txt").write_text("images/val/valid_0000.jpg\nimages/val/missing.jpg\n")
    data = yaml.safe_load((yolo_root / "data.yaml").read_text())
    data["val"] = "val.txt"
    (yolo_root / "data.yaml").write_text(yaml.safe_dump(data))
    details = errors_of(yolo_root, tmp_path / "out")
    by_file = {d["file"]: d["problem"] for d in details}
    assert "not a readable image" in by_file[victim.relative_to(yolo_root).as_posix()]
    assert "missing.jpg" in by_file["val.txt"] and "does not exist" in by_file["val.txt"]


def test_an_image_list_over_the_annotation_limit_is_refused_unread(yolo_root: Path, tmp_path: Path) -> None:
    (yolo_root / "val.txt").write_text("images/val/valid_0000.jpg\n" * 100)
    data = yaml.safe_load((yolo_root / "data.yaml").read_text())
    data["val"] = "val.txt"
    (yolo_root / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(DatasetError) as info:
        prepare_yolo_dataset(yolo_root, None, tmp_path / "out", annotation_max_bytes=1000)
    (refused,) = [d for d in info.value.details if d["code"] == "file_too_large"]
    assert refused["file"] == "val.txt" and "annotation_max_bytes" in refused["problem"]


def test_unreadable_image_is_reported_once_and_its_label_is_not_an_orphan(
    yolo_root: Path, tmp_path: Path
) -> None:
    victim = sorted((yolo_root / "images" / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not an image" * 10)
    with pytest.raises(DatasetError) as info:
        prepare_yolo_dataset(yolo_root, None, tmp_path / "out", annotation_max_bytes=ANNOTATION_MAX_BYTES)
    assert [(d["file"], d["code"]) for d in info.value.details] == [
        (victim.relative_to(yolo_root).as_posix(), "unreadable_image")
    ]


def test_duplicate_image_names(yolo_root: Path, tmp_path: Path) -> None:
    image = sorted((yolo_root / "images" / "train").glob("*.jpg"))[0]
    shutil.copyfile(image, image.with_suffix(".png"))
    (detail,) = errors_of(yolo_root, tmp_path / "out")
    assert "duplicate image" in detail["problem"]


def test_boxes_outside_or_without_area_are_warnings(yolo_root: Path, tmp_path: Path) -> None:
    label = first_label(yolo_root)
    label.write_text(label.read_text() + "0 0.95 0.95 0.3 0.3\n1 0.5 0.5 0 0.2\n")
    orphan = yolo_root / "labels" / "train" / "no_such_image.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    prepared = prepare_yolo_dataset(
        yolo_root, None, tmp_path / "out", annotation_max_bytes=ANNOTATION_MAX_BYTES
    )
    text = " ".join(prepared.warnings)
    assert "1 box extended outside its image and was clipped" in text
    assert "1 box had zero or negative area" in text
    assert "label file has no image" in text and "no_such_image.txt" in text
    image = sorted((yolo_root / "images" / "train").glob("*.jpg"))[0].relative_to(yolo_root).as_posix()
    assert f"{image} label line" in text


def test_image_without_label_file_is_a_background_image(yolo_root: Path, tmp_path: Path) -> None:
    first_label(yolo_root).unlink()
    prepared = prepare_yolo_dataset(
        yolo_root, None, tmp_path / "out", annotation_max_bytes=ANNOTATION_MAX_BYTES
    )
    assert prepared.stats["train"].images_without_boxes == 1
    assert any("1 image has no boxes" in w for w in prepared.warnings)


def test_pixel_coordinates_instead_of_normalised_are_an_error(yolo_root: Path, tmp_path: Path) -> None:
    for label in (yolo_root / "labels" / "train").glob("*.txt"):
        label.write_text("0 40 40 20 20\n1 50 30 10 10\n")
    details = errors_of(yolo_root, tmp_path / "out")
    assert any("box format is probably wrong" in d["problem"] for d in details)


def test_report_of_a_broken_dataset_keeps_counts(yolo_root: Path) -> None:
    first_label(yolo_root).write_text("9 0.5 0.5 0.2 0.2\n")
    result = report(yolo_root)
    assert result["ok"] is False and result["errors"] == 1
    assert result["splits"]["train"]["images"] == 6  # type: ignore[index]
    problem = result["problems"][0]  # type: ignore[index]
    assert set(problem) == {"file", "problem", "severity", "code"} and problem["file"].startswith(
        "labels/train/"
    )
    assert problem["code"] == "unknown_class"
