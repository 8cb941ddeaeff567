"""COCO dataset validation and sanitizing: one test per problem the validator must catch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.datasets.coco import SplitRef, prepare_coco_dataset, resolve_coco_splits
from app.datasets.pipeline import PreparedDataset
from app.datasets.problems import ERROR_CODES, MAX_ERRORS, WARNING_CODES
from app.errors import DatasetError
from tests.support import ANNOTATION_MAX_BYTES

TRAIN = SplitRef(images="train", annotations="train/_annotations.coco.json")
VAL = SplitRef(images="valid", annotations="valid/_annotations.coco.json")
TRAIN_FILE = "train/_annotations.coco.json"
VAL_FILE = "valid/_annotations.coco.json"

# --------------------------------------------------------------------------------------------------
# Corruption helpers
# --------------------------------------------------------------------------------------------------


def load_coco(root: Path, rel: str = TRAIN_FILE) -> dict[str, Any]:
    """The parsed annotation file."""
    return json.loads((root / rel).read_text())


def save_coco(root: Path, data: dict[str, Any], rel: str = TRAIN_FILE) -> None:
    """Overwrite an annotation file."""
    (root / rel).write_text(json.dumps(data))


def first_annotation_of(data: dict[str, Any], image_id: int) -> dict[str, Any]:
    """The first annotation on an image (every generated image has at least one)."""
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def image_entry(data: dict[str, Any], image_id: int) -> dict[str, Any]:
    """The `images` entry with this id."""
    return next(i for i in data["images"] if i["id"] == image_id)


def delete_image_file(root: Path, image_id: int, rel: str = TRAIN_FILE) -> str:
    """Remove one image from disk; returns its path relative to the root."""
    data = load_coco(root, rel)
    rel_path = f"{Path(rel).parent.as_posix()}/{image_entry(data, image_id)['file_name']}"
    (root / rel_path).unlink()
    return rel_path


def overwrite_image_with_garbage(root: Path, image_id: int, rel: str = TRAIN_FILE) -> str:
    """Replace an image's bytes with something that is not an image; returns its relative path."""
    data = load_coco(root, rel)
    rel_path = f"{Path(rel).parent.as_posix()}/{image_entry(data, image_id)['file_name']}"
    (root / rel_path).write_bytes(b"this is not a jpeg\x00\x01\x02" * 20)
    return rel_path


def set_annotation_field(
    root: Path, annotation_id: int, key: str, value: object, rel: str = TRAIN_FILE
) -> None:
    """Set one field of one annotation (found by id)."""
    data = load_coco(root, rel)
    next(a for a in data["annotations"] if a["id"] == annotation_id)[key] = value
    save_coco(root, data, rel)


def set_box_of_first_annotation(root: Path, image_id: int, bbox: list[float], rel: str = TRAIN_FILE) -> int:
    """Give the first box of an image new xywh coordinates; returns that annotation's id."""
    data = load_coco(root, rel)
    annotation = first_annotation_of(data, image_id)
    annotation["bbox"] = bbox
    save_coco(root, data, rel)
    return int(annotation["id"])


def set_file_name(root: Path, image_id: int, file_name: str, rel: str = TRAIN_FILE) -> None:
    """Point an image entry at another file name."""
    data = load_coco(root, rel)
    image_entry(data, image_id)["file_name"] = file_name
    save_coco(root, data, rel)


def add_category(root: Path, category: dict[str, Any], rel: str = TRAIN_FILE) -> None:
    """Append a category."""
    data = load_coco(root, rel)
    data["categories"].append(category)
    save_coco(root, data, rel)


def prepare(root: Path, out_dir: Path) -> PreparedDataset:
    """Prepare with the default Roboflow splits."""
    train, val = resolve_coco_splits(root, None, None)
    return prepare_coco_dataset(root, train, val, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES)


def prepare_error(root: Path, out_dir: Path) -> DatasetError:
    """Prepare, expecting a DatasetError; checks the details' shape and that nothing was written."""
    with pytest.raises(DatasetError) as info:
        prepare(root, out_dir)
    error = info.value
    assert isinstance(error.details, list) and error.details
    for detail in error.details:
        assert set(detail) == {"file", "problem", "severity", "code"}
        assert detail["severity"] in ("error", "warning")
        assert detail["code"] in (ERROR_CODES if detail["severity"] == "error" else WARNING_CODES)
    assert not (out_dir / "train.json").exists()
    return error


def error_details(error: DatasetError) -> list[dict[str, str]]:
    """Only the error-severity details."""
    return [d for d in error.details if d["severity"] == "error"]


def sanitized(prepared: PreparedDataset, split: str = "train") -> dict[str, Any]:
    """The sanitized annotation file written for a split."""
    files = prepared.train if split == "train" else prepared.val
    return json.loads(files.annotation_file.read_text())


# --------------------------------------------------------------------------------------------------
# Split resolution
# --------------------------------------------------------------------------------------------------


def test_default_roboflow_layout_resolution(shapes_root: Path) -> None:
    train, val = resolve_coco_splits(shapes_root, None, None)
    assert train == TRAIN
    assert val == VAL


def test_explicit_splits_are_kept(shapes_root: Path) -> None:
    custom = SplitRef(images="valid", annotations="valid/_annotations.coco.json")
    assert resolve_coco_splits(shapes_root, custom, TRAIN) == (custom, TRAIN)


def test_valid_falls_back_to_val_then_test(shapes_root: Path) -> None:
    (shapes_root / "valid").rename(shapes_root / "test")
    assert resolve_coco_splits(shapes_root, None, None)[1] == SplitRef("test", "test/_annotations.coco.json")
    shutil.copytree(shapes_root / "test", shapes_root / "val")
    assert resolve_coco_splits(shapes_root, None, None)[1] == SplitRef("val", "val/_annotations.coco.json")


def test_missing_everything_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError) as info:
        resolve_coco_splits(tmp_path / "empty", None, None)
    message = info.value.message
    assert "no training split" in message and "no validation split" in message
    assert "train/_annotations.coco.json" in message
    assert "annotations/instances_train*.json" in message
    assert "valid/_annotations.coco.json" in message and "test/_annotations.coco.json" in message
    assert len(info.value.details) == 2


def test_missing_validation_split_only(shapes_root: Path) -> None:
    shutil.rmtree(shapes_root / "valid")
    with pytest.raises(DatasetError) as info:
        resolve_coco_splits(shapes_root, None, None)
    assert "no validation split" in info.value.message
    assert "no training split" not in info.value.message


def test_classic_coco_layout_resolution(shapes_root: Path, out_dir: Path) -> None:
    (shapes_root / "annotations").mkdir()
    (shapes_root / "images").mkdir()
    for src, name in (("train", "train2017"), ("valid", "val2017")):
        (shapes_root / src / "_annotations.coco.json").rename(
            shapes_root / "annotations" / f"instances_{name}.json"
        )
        (shapes_root / src).rename(shapes_root / "images" / name)
    train, val = resolve_coco_splits(shapes_root, None, None)
    assert train == SplitRef("images/train2017", "annotations/instances_train2017.json")
    assert val == SplitRef("images/val2017", "annotations/instances_val2017.json")
    assert (
        prepare_coco_dataset(shapes_root, train, val, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES)
        .stats["val"]
        .images
        == 3
    )


def test_dataset_wrapped_in_one_folder_is_found(tmp_path: Path, shapes_root: Path) -> None:
    wrapper = tmp_path / "upload"
    wrapper.mkdir()
    shapes_root.rename(wrapper / "my-dataset")
    train, val = resolve_coco_splits(wrapper, None, None)
    assert train == SplitRef("my-dataset/train", "my-dataset/train/_annotations.coco.json")
    assert val == SplitRef("my-dataset/valid", "my-dataset/valid/_annotations.coco.json")


def test_split_paths_escaping_the_root_are_rejected(shapes_root: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_coco_splits(shapes_root, SplitRef("../elsewhere", "../elsewhere/a.json"), None)
    assert "outside the dataset" in info.value.message


# --------------------------------------------------------------------------------------------------
# A clean dataset
# --------------------------------------------------------------------------------------------------


def test_clean_dataset_sanitized_output(shapes_root: Path, out_dir: Path) -> None:
    prepared = prepare(shapes_root, out_dir)
    assert prepared.warnings == []
    assert prepared.train.images_dir == (shapes_root / "train").resolve()
    assert prepared.train.images_dir.is_absolute()
    assert prepared.train.annotation_file == (out_dir / "train.json").resolve()
    assert prepared.val.annotation_file == (out_dir / "val.json").resolve()
    assert (prepared.train.num_images, prepared.val.num_images) == (6, 3)

    source = load_coco(shapes_root)
    train = sanitized(prepared)
    assert train["categories"] == [
        {"id": 0, "name": "circle", "supercategory": "none"},
        {"id": 1, "name": "square", "supercategory": "none"},
        {"id": 2, "name": "triangle", "supercategory": "none"},
    ]
    # file_name stays relative to SplitFiles.images_dir, so data_dir/images_dir/file_name resolves.
    for image in train["images"]:
        assert (prepared.train.images_dir / image["file_name"]).is_file()
        with Image.open(prepared.train.images_dir / image["file_name"]) as real:
            assert (image["width"], image["height"]) == real.size
    # Source category ids are shifted by the placeholder (1..3); sanitized ones are 0..2.
    assert len(train["annotations"]) == len(source["annotations"])
    for before, after in zip(source["annotations"], train["annotations"], strict=True):
        assert after["category_id"] == before["category_id"] - 1
        assert after["bbox"] == before["bbox"]
        assert after["iscrowd"] == 0
    stats = prepared.stats["train"]
    assert stats.images == 6 and stats.boxes == len(source["annotations"])
    assert sum(stats.boxes_per_class.values()) == stats.boxes
    assert prepared.summary()["stats"]["val"]["images"] == 3


def test_crowd_annotations_are_kept(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    annotation_id = data["annotations"][0]["id"]
    set_annotation_field(shapes_root, annotation_id, "iscrowd", 1)
    prepared = prepare(shapes_root, out_dir)
    assert sanitized(prepared)["annotations"][0]["iscrowd"] == 1
    assert prepared.stats["train"].crowd_boxes == 1


# --------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------


def test_roboflow_placeholder_category_is_not_a_class(shapes_root: Path, out_dir: Path) -> None:
    assert load_coco(shapes_root)["categories"][0] == {"id": 0, "name": "shapes", "supercategory": "none"}
    prepared = prepare(shapes_root, out_dir)
    assert prepared.class_names == ("circle", "square", "triangle")
    assert [c["name"] for c in sanitized(prepared, "val")["categories"]] == ["circle", "square", "triangle"]


def test_non_placeholder_empty_category_is_kept(shapes_root: Path, out_dir: Path) -> None:
    add_category(shapes_root, {"id": 7, "name": "hexagon", "supercategory": "shapes"})
    prepared = prepare(shapes_root, out_dir)
    assert prepared.class_names == ("circle", "square", "triangle", "hexagon")
    assert prepared.stats["train"].classes_without_boxes == ["hexagon"]
    assert prepared.stats["train"].boxes_per_class["hexagon"] == 0
    assert sanitized(prepared)["categories"][3] == {"id": 3, "name": "hexagon", "supercategory": "none"}
    assert any('1 class has no boxes in the training split (e.g. "hexagon")' in w for w in prepared.warnings)


def test_val_category_mapped_by_name_not_id(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root, VAL_FILE)
    # Renumber val's categories: the sanitized labels must still follow the names.
    renumber = {0: 10, 1: 13, 2: 12, 3: 11}
    for category in data["categories"]:
        category["id"] = renumber[category["id"]]
    for annotation in data["annotations"]:
        annotation["category_id"] = renumber[annotation["category_id"]]
    save_coco(shapes_root, data, VAL_FILE)
    source = load_coco(shapes_root, VAL_FILE)
    names = {c["id"]: c["name"] for c in source["categories"]}
    prepared = prepare(shapes_root, out_dir)
    for before, after in zip(source["annotations"], sanitized(prepared, "val")["annotations"], strict=True):
        assert prepared.class_names[after["category_id"]] == names[before["category_id"]]


def test_no_classes(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    data["categories"] = []
    data["annotations"] = []
    save_coco(shapes_root, data)
    error = prepare_error(shapes_root, out_dir)
    assert f"{TRAIN_FILE}: has no classes, so there is nothing to train" in error.message
    assert [d["code"] for d in error_details(error)] == ["no_classes"]


def test_val_category_unknown_to_train(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root, VAL_FILE)
    data["categories"].append({"id": 9, "name": "star", "supercategory": "shapes"})
    data["annotations"][0]["category_id"] = 9
    save_coco(shapes_root, data, VAL_FILE)
    error = prepare_error(shapes_root, out_dir)
    details = error_details(error)
    assert len(details) == 1  # reported once, not again as an unknown id on each annotation
    assert details[0]["file"] == VAL_FILE
    assert 'category "star" (id 9) is not a class of the training split' in details[0]["problem"]
    assert "circle, square, triangle" in details[0]["problem"]


def test_val_category_unknown_to_train_without_boxes_is_only_a_warning(
    shapes_root: Path, out_dir: Path
) -> None:
    add_category(shapes_root, {"id": 9, "name": "star", "supercategory": "shapes"}, VAL_FILE)
    prepared = prepare(shapes_root, out_dir)
    assert prepared.class_names == ("circle", "square", "triangle")
    assert any("not training classes" in w or "not a training class" in w for w in prepared.warnings)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_missing_image(shapes_root: Path, out_dir: Path) -> None:
    rel_path = delete_image_file(shapes_root, image_id=2)
    error = prepare_error(shapes_root, out_dir)
    assert error_details(error) == [
        {
            "file": rel_path,
            "problem": f"image file does not exist (image id 2 in {TRAIN_FILE})",
            "severity": "error",
            "code": "missing_image",
        }
    ]
    assert rel_path in error.message


def test_unreadable_image(shapes_root: Path, out_dir: Path) -> None:
    rel_path = overwrite_image_with_garbage(shapes_root, image_id=1, rel=VAL_FILE)
    error = prepare_error(shapes_root, out_dir)
    [detail] = error_details(error)
    assert detail["file"] == rel_path == "valid/valid_0001.jpg"
    assert "not a readable image" in detail["problem"] and VAL_FILE in detail["problem"]


def test_unsupported_image_format(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    name = image_entry(data, 0)["file_name"]
    with Image.open(shapes_root / "train" / name) as image:
        image.save(shapes_root / "train" / name, format="GIF")  # OpenCV cannot read GIF
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert "GIF is not supported" in detail["problem"]


def test_json_not_parseable(shapes_root: Path, out_dir: Path) -> None:
    (shapes_root / TRAIN_FILE).write_text('{"images": [')
    error = prepare_error(shapes_root, out_dir)
    [detail] = error_details(error)
    assert detail["file"] == TRAIN_FILE
    assert detail["problem"].startswith("is not valid JSON")


@pytest.mark.parametrize(
    ("content", "problem", "code"),
    [
        ([], "top level must be a JSON object, got list", "bad_schema"),
        ({"images": [], "categories": []}, 'missing key "annotations"', "bad_schema"),
        (
            {"images": {}, "annotations": [], "categories": []},
            '"images" must be a list, got dict',
            "bad_schema",
        ),
    ],
)
def test_json_with_wrong_shape(
    shapes_root: Path, out_dir: Path, content: object, problem: str, code: str
) -> None:
    (shapes_root / TRAIN_FILE).write_text(json.dumps(content))
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert detail == {"file": TRAIN_FILE, "problem": problem, "severity": "error", "code": code}


def test_annotation_file_missing(shapes_root: Path, out_dir: Path) -> None:
    (shapes_root / VAL_FILE).unlink()
    with pytest.raises(DatasetError) as info:
        prepare_coco_dataset(shapes_root, TRAIN, VAL, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES)
    assert info.value.details[0]["file"] == VAL_FILE
    assert "annotation file of the val split does not exist" in info.value.message


def test_unknown_category_id(shapes_root: Path, out_dir: Path) -> None:
    annotation_id = load_coco(shapes_root)["annotations"][3]["id"]
    set_annotation_field(shapes_root, annotation_id, "category_id", 42)
    error = prepare_error(shapes_root, out_dir)
    [detail] = error_details(error)
    assert detail["file"] == TRAIN_FILE
    assert f"annotation id {annotation_id} has category_id 42" in detail["problem"]
    assert "not among the categories (ids 0, 1, 2, 3)" in detail["problem"]
    assert TRAIN_FILE in error.message and "42" in error.message


def test_empty_split(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root, VAL_FILE)
    data["images"], data["annotations"] = [], []
    save_coco(shapes_root, data, VAL_FILE)
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert detail == {
        "file": VAL_FILE,
        "problem": "the val split has no images",
        "severity": "error",
        "code": "empty_split",
    }


def test_train_without_any_box(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    data["annotations"] = []
    save_coco(shapes_root, data)
    details = error_details(prepare_error(shapes_root, out_dir))
    assert {
        "file": TRAIN_FILE,
        "problem": "the training split has no usable boxes",
        "severity": "error",
        "code": "no_boxes",
    } in details


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("bbox", [1, 2, 3], "has a malformed bbox [1, 2, 3]"),
        ("bbox", [1, 2, "3", 4], "has a malformed bbox"),
        ("bbox", None, "has a malformed bbox None"),
        ("image_id", 999, "refers to image_id 999, which is not among the images"),
        ("iscrowd", 5, "has iscrowd 5"),
    ],
)
def test_malformed_annotation(
    shapes_root: Path, out_dir: Path, field: str, value: object, problem: str
) -> None:
    annotation_id = load_coco(shapes_root)["annotations"][0]["id"]
    set_annotation_field(shapes_root, annotation_id, field, value)
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert detail["file"] == TRAIN_FILE
    assert detail["problem"].startswith(f"annotation id {annotation_id} {problem}")


def test_nan_in_bbox(shapes_root: Path, out_dir: Path) -> None:
    path = shapes_root / TRAIN_FILE
    data = load_coco(shapes_root)
    data["annotations"][0]["bbox"] = [1.0, 2.0, float("nan"), 4.0]
    path.write_text(json.dumps(data))  # json writes NaN, as some exporters do
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert "malformed bbox [1.0, 2.0, nan, 4.0]" in detail["problem"]


def test_duplicate_image_ids(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    data["images"][1]["id"] = data["images"][0]["id"]
    save_coco(shapes_root, data)
    details = error_details(prepare_error(shapes_root, out_dir))
    expected = {"file": TRAIN_FILE, "problem": "image id 0 appears twice", "severity": "error"}
    assert dict(expected, code="duplicate_image") in details


@pytest.mark.parametrize("file_name", ["../valid/valid_0000.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_path_traversal_in_file_name(shapes_root: Path, out_dir: Path, file_name: str) -> None:
    set_file_name(shapes_root, 0, file_name)
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert detail["file"] == TRAIN_FILE
    assert f"image id 0 has file_name {file_name!r}, which leaves the images folder" == detail["problem"]


def test_symlink_out_of_the_dataset_is_rejected(tmp_path: Path, shapes_root: Path, out_dir: Path) -> None:
    outside = tmp_path / "outside.jpg"
    shutil.copy(shapes_root / "train" / "train_0000.jpg", outside)
    (shapes_root / "train" / "train_0000.jpg").unlink()
    os.symlink(outside, shapes_root / "train" / "train_0000.jpg")
    [detail] = error_details(prepare_error(shapes_root, out_dir))
    assert detail["file"] == "train/train_0000.jpg" and "links outside the dataset" in detail["problem"]


def test_all_problems_are_reported_at_once(shapes_root: Path, out_dir: Path) -> None:
    delete_image_file(shapes_root, image_id=0)
    overwrite_image_with_garbage(shapes_root, image_id=1)
    set_annotation_field(shapes_root, load_coco(shapes_root)["annotations"][-1]["id"], "category_id", 77)
    (shapes_root / VAL_FILE).write_text("not json")
    error = prepare_error(shapes_root, out_dir)
    problems = [d["problem"] for d in error_details(error)]
    assert len(problems) == 4
    assert error.message.startswith("The dataset has 4 problems:")
    assert "(and 1 more)" in error.message


def test_errors_are_capped(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    data["annotations"] += [dict(data["annotations"][0], id=1000 + i, category_id=99) for i in range(80)]
    save_coco(shapes_root, data)
    error = prepare_error(shapes_root, out_dir)
    details = error_details(error)
    assert len(details) == MAX_ERRORS + 1
    assert details[-1]["problem"] == f"{80 - MAX_ERRORS} more errors not listed"
    assert error.message.startswith("The dataset has 80 problems")


# --------------------------------------------------------------------------------------------------
# Warnings and fixes
# --------------------------------------------------------------------------------------------------


def test_out_of_bounds_box_is_clipped(shapes_root: Path, out_dir: Path) -> None:
    width, height = (image_entry(load_coco(shapes_root), 3)[k] for k in ("width", "height"))
    annotation_id = set_box_of_first_annotation(shapes_root, 3, [-5.0, 10.0, width + 20.0, 20.0])
    prepared = prepare(shapes_root, out_dir)
    assert prepared.warnings == [
        "1 box extended outside its image and was clipped "
        f"(e.g. train/train_0003.jpg annotation id {annotation_id})"
    ]
    box = next(a for a in sanitized(prepared)["annotations"] if a["image_id"] == 3)
    assert box["bbox"] == [0.0, 10.0, float(width), 20.0]
    assert box["area"] == width * 20.0
    assert height > 30


def test_several_clipped_boxes_are_aggregated(shapes_root: Path, out_dir: Path) -> None:
    ids = [set_box_of_first_annotation(shapes_root, i, [-3.0, -3.0, 20.0, 20.0]) for i in range(5)]
    prepared = prepare(shapes_root, out_dir)
    examples = ", ".join(f"train/train_{i:04d}.jpg annotation id {a}" for i, a in enumerate(ids[:3]))
    assert prepared.warnings == [
        f"5 boxes extended outside their image and were clipped (e.g. {examples}, ...)"
    ]


@pytest.mark.parametrize("bbox", [[10.0, 10.0, 0.0, 5.0], [10.0, 10.0, -4.0, 5.0], [5000.0, 10.0, 8.0, 8.0]])
def test_zero_area_box_is_dropped(shapes_root: Path, out_dir: Path, bbox: list[float]) -> None:
    boxes_before = len(load_coco(shapes_root)["annotations"])
    annotation_id = set_box_of_first_annotation(shapes_root, 0, bbox)
    prepared = prepare(shapes_root, out_dir)
    assert any(
        w.startswith("1 box had zero or negative area (after clipping) and was dropped")
        and f"annotation id {annotation_id}" in w
        for w in prepared.warnings
    )
    assert len(sanitized(prepared)["annotations"]) == boxes_before - 1
    assert prepared.stats["train"].boxes == boxes_before - 1


def test_most_boxes_outside_their_image_is_an_error(shapes_root: Path, out_dir: Path) -> None:
    # As for YOLO and HF: when most boxes stick out of their image (here all moved by 40 pixels),
    # the boxes are wrong, and clipping them all would train on garbage.
    data = load_coco(shapes_root)
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        annotation["bbox"] = [x + 40, y + 40, w, h]
    save_coco(shapes_root, data)
    details = error_details(prepare_error(shapes_root, out_dir))
    assert [d["code"] for d in details] == ["bad_box_share"]
    assert details[0]["file"] == TRAIN_FILE and "the box format is probably wrong" in details[0]["problem"]


def test_image_without_boxes_is_a_warning(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    save_coco(shapes_root, data)
    prepared = prepare(shapes_root, out_dir)
    assert prepared.warnings == ["1 image has no boxes (e.g. train/train_0004.jpg)"]
    assert prepared.stats["train"].images_without_boxes == 1
    assert any(i["id"] == 4 for i in sanitized(prepared)["images"])


def test_wrong_image_size_in_json_uses_the_real_size(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    real = (image_entry(data, 0)["width"], image_entry(data, 0)["height"])
    image_entry(data, 0)["width"] = 4000
    save_coco(shapes_root, data)
    prepared = prepare(shapes_root, out_dir)
    assert prepared.warnings == [
        "1 image has a width/height in its annotations that differs from the file; "
        f"the file's size is used (e.g. train/train_0000.jpg is {real[0]}x{real[1]})"
    ]
    assert (
        image_entry(sanitized(prepared), 0)["width"],
        image_entry(sanitized(prepared), 0)["height"],
    ) == real


def test_exif_rotated_image_gets_the_rotated_size(shapes_root: Path, out_dir: Path) -> None:
    data = load_coco(shapes_root)
    entry = image_entry(data, 0)
    path = shapes_root / "train" / entry["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: OpenCV swaps width and height when it reads the file
    with Image.open(path) as image:
        image.load()
        image.save(path, exif=exif.tobytes())
    entry["width"], entry["height"] = entry["height"], entry["width"]
    save_coco(shapes_root, data)
    prepared = prepare(shapes_root, out_dir)
    assert [w for w in prepared.warnings if "EXIF" in w] == [
        "1 image carries an EXIF rotation, which training applies: check that its boxes match the rotated "
        "image (e.g. train/train_0000.jpg)"
    ]
    written = image_entry(sanitized(prepared), 0)
    assert (written["width"], written["height"]) == (entry["width"], entry["height"])


def test_validation_images_shared_with_training(shapes_root: Path, out_dir: Path) -> None:
    prepared = prepare_coco_dataset(
        shapes_root, TRAIN, TRAIN, out_dir, annotation_max_bytes=ANNOTATION_MAX_BYTES
    )
    assert any(w.startswith("6 validation images are also in the training split") for w in prepared.warnings)


# --------------------------------------------------------------------------------------------------
# Speed and compatibility
# --------------------------------------------------------------------------------------------------


def test_header_reads_do_not_decode_images(
    shapes_root: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_load(self: Image.Image) -> None:
        raise AssertionError("full decode during validation")

    monkeypatch.setattr(Image.Image, "load", fail_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", fail_load)
    assert prepare(shapes_root, out_dir).stats["train"].images == 6


@pytest.mark.skipif(
    importlib.util.find_spec("super_gradients") is None, reason="super-gradients not installed"
)
def test_super_gradients_reads_the_sanitized_file(shapes_root: Path, out_dir: Path, tmp_path: Path) -> None:
    # A subprocess: importing super-gradients replaces sys.stdout and the root log handlers.
    prepared = prepare(shapes_root, out_dir)
    script = textwrap.dedent(
        f"""
        import json
        from super_gradients.training.datasets.detection_datasets.coco_format_detection import (
            COCOFormatDetectionDataset,
        )
        ds = COCOFormatDetectionDataset(
            data_dir={str(out_dir.resolve())!r},
            images_dir={str(prepared.train.images_dir)!r},
            json_annotation_file={str(prepared.train.annotation_file)!r},
            input_dim=None, transforms=[], with_crowd=False, ignore_empty_annotations=False,
        )
        labels = [ds[i][1][:, 4].tolist() for i in range(len(ds))]
        result = {{"classes": [str(c) for c in ds.classes], "labels": labels}}
        open({str(tmp_path / "sg.json")!r}, "w").write(json.dumps(result))
        """
    )
    env = dict(
        os.environ,
        CRASH_HANDLER="FALSE",
        CONSOLE_LOG_LEVEL="ERROR",
        SUPER_GRADIENTS_LOG_DIR=str(tmp_path / "sg_logs"),
        NO_ALBUMENTATIONS_UPDATE="1",
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "sg.json").read_text())
    assert result["classes"] == ["circle", "square", "triangle"]
    source = load_coco(shapes_root)
    expected = [
        sorted(a["category_id"] - 1 for a in source["annotations"] if a["image_id"] == image["id"])
        for image in source["images"]
    ]
    assert [sorted(labels) for labels in result["labels"]] == expected
