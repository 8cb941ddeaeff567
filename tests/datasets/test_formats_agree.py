"""The same data as COCO, YOLO and Hugging Face: the three validation reports must agree.

One generated dataset, with problems planted in it, is written in each format. Every rule lives in
`app.datasets.pipeline`, so the classes, the split counts and the problems (by code and severity,
with their counts) must be the same whichever format the data came in; only the names of the files
in the messages differ.

Pixel values are chosen to survive YOLO's normalisation exactly: image sides are powers of two and
boxes have integer coordinates, so `value / side * side == value` in floating point.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw

from app.datasets.demo import hf_features
from app.datasets.formats import DatasetOptions, detect_format, prepare_dataset, validate_dataset
from app.datasets.problems import ERROR_CODES, WARNING_CODES
from tests.support import ANNOTATION_MAX_BYTES

CLASSES = ("circle", "square", "triangle")
UNKNOWN_CLASS = 7


@dataclass(frozen=True)
class Shape:
    """A box in pixels: class index, top-left corner, width and height."""

    label: int
    x: int
    y: int
    w: int
    h: int


@dataclass
class Picture:
    name: str
    width: int
    height: int
    shapes: list[Shape] = field(default_factory=list)


@dataclass
class Data:
    train: list[Picture]
    val: list[Picture]


def generated(with_errors: bool) -> Data:
    """Training: a clipped box, a zero-area box, an image without boxes, no triangles, an image also
    in the validation split. With errors: a box of an unknown class, and a validation split where
    most boxes stick out of their image (the bad-box-share error)."""
    shared = Picture("t4.png", 64, 64, [Shape(0, 4, 4, 20, 20), Shape(1, 30, 30, 24, 24)])
    train = [
        Picture("t0.png", 128, 64, [Shape(0, 10, 10, 20, 20), Shape(1, 60, 20, 30, 30)]),
        Picture("t1.png", 64, 64, [Shape(0, 8, 8, 16, 16), Shape(0, 50, 40, 20, 20)]),  # clipped
        Picture("t2.png", 64, 128, [Shape(1, 10, 10, 20, 30), Shape(1, 10, 60, 0, 12)]),  # zero width
        Picture("t3.png", 64, 64),  # no boxes
        shared,
        Picture("t5.png", 128, 128, [Shape(0, 32, 32, 64, 64)]),
    ]
    val = [
        Picture("v0.png", 64, 64, [Shape(2, 5, 5, 10, 10), Shape(1, 20, 20, 16, 16)]),
        Picture("v1.png", 128, 64, [Shape(2, 40, 10, 30, 30)]),
        Picture("v2.png", 64, 128, [Shape(1, 10, 70, 20, 40)]),
        shared,
    ]
    if with_errors:
        train[5].shapes.append(Shape(UNKNOWN_CLASS, 0, 0, 10, 10))
        val[0].shapes = [Shape(0, 40, 40, 40, 40), Shape(1, 50, 0, 30, 10), Shape(2, 5, 5, 10, 10)]
        val[1].shapes = [Shape(2, 100, 30, 50, 50), Shape(0, -10, -10, 30, 30)]
        val[2].shapes = [Shape(1, 10, 100, 20, 40)]
    return Data(train, val)


def draw_images(data: Data, folder: Path) -> None:
    """Distinct images (Hugging Face images are told apart by content), boxes drawn for the eye."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for picture in {p.name: p for p in data.train + data.val}.values():
        image = Image.new("RGB", (picture.width, picture.height), tuple(rng.randint(0, 90) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for s in picture.shapes:
            draw.rectangle((s.x, s.y, s.x + max(s.w, 1), s.y + max(s.h, 1)), outline=(255, 255, 255))
        image.save(folder / picture.name)


def splits(data: Data) -> list[tuple[str, list[Picture]]]:
    return [("train", data.train), ("val", data.val)]


# --------------------------------------------------------------------------------------------------
# The three formats
# --------------------------------------------------------------------------------------------------


def write_coco(data: Data, root: Path) -> Path:
    """COCO's own layout with one images folder, so both splits can list the shared image."""
    draw_images(data, root / "images")
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shapes"} for i, n in enumerate(CLASSES)]
    for split, pictures in splits(data):
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, picture in enumerate(pictures):
            images.append(
                {"id": image_id, "file_name": picture.name, "width": picture.width, "height": picture.height}
            )
            for s in picture.shapes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": s.label + 1,
                        "bbox": [s.x, s.y, s.w, s.h],
                        "area": s.w * s.h,
                        "iscrowd": 0,
                    }
                )
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def write_yolo(data: Data, root: Path) -> Path:
    """Ultralytics layout with image lists (`train.txt`, `val.txt`) naming images in one folder."""
    draw_images(data, root / "images")
    (root / "labels").mkdir(parents=True)
    for split, pictures in splits(data):
        (root / f"{split}.txt").write_text("".join(f"images/{p.name}\n" for p in pictures))
        for p in pictures:
            lines = [
                f"{s.label} {(s.x + s.w / 2) / p.width!r} {(s.y + s.h / 2) / p.height!r} "
                f"{s.w / p.width!r} {s.h / p.height!r}\n"
                for s in p.shapes
            ]
            (root / "labels" / Path(p.name).with_suffix(".txt")).write_text("".join(lines))
    layout = {"names": list(CLASSES), "nc": len(CLASSES), "train": "train.txt", "val": "val.txt"}
    (root / "data.yaml").write_text(yaml.safe_dump(layout))
    return root


def write_hf(data: Data, root: Path) -> Path:
    """Parquet files as `datasets` writes them, boxes in xywh pixels, categories a ClassLabel."""
    from datasets import Dataset

    images = root / ".images"
    draw_images(data, images)
    features = hf_features(CLASSES)
    (root / "data").mkdir(parents=True)
    for split, pictures in splits(data):
        rows: dict[str, list[Any]] = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
        unknown: list[tuple[int, int]] = []  # (row, box) of boxes whose class ClassLabel would refuse
        for index, p in enumerate(pictures):
            rows["image_id"].append(index)
            rows["image"].append({"bytes": (images / p.name).read_bytes(), "path": None})
            rows["width"].append(p.width)
            rows["height"].append(p.height)
            rows["objects"].append(
                {
                    "bbox": [[s.x, s.y, s.w, s.h] for s in p.shapes],
                    "category": [0 if s.label == UNKNOWN_CLASS else s.label for s in p.shapes],
                }
            )
            unknown += [(index, n) for n, s in enumerate(p.shapes) if s.label == UNKNOWN_CLASS]
        name = "train" if split == "train" else "validation"
        path = root / "data" / f"{name}-00000-of-00001.parquet"
        Dataset.from_dict(rows, features=features).to_parquet(str(path))
        if unknown:
            table = pq.read_table(path)
            edited = table.to_pylist()
            for row, box in unknown:
                edited[row]["objects"]["category"][box] = UNKNOWN_CLASS
            pq.write_table(type(table).from_pylist(edited, schema=table.schema), path)
    for file in images.iterdir():
        file.unlink()
    images.rmdir()
    return root


WRITERS = {"coco": write_coco, "yolo": write_yolo, "hf": write_hf}


def written(tmp_path: Path, with_errors: bool) -> dict[str, Path]:
    data = generated(with_errors)
    return {fmt: writer(data, tmp_path / fmt) for fmt, writer in WRITERS.items()}


def options(fmt: str) -> DatasetOptions:
    return DatasetOptions(format=fmt, bbox_format="xywh" if fmt == "hf" else None)


def without_examples(text: str) -> str:
    return text.split(" (e.g. ")[0]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_each_copy_is_detected_as_its_format(tmp_path: Path) -> None:
    for fmt, root in written(tmp_path, with_errors=False).items():
        assert detect_format(root) == (fmt, root)


def test_reports_agree_on_a_dataset_with_errors(tmp_path: Path) -> None:
    reports = {
        fmt: validate_dataset(
            root, options(fmt), tmp_path / "cache", annotation_max_bytes=ANNOTATION_MAX_BYTES
        )
        for fmt, root in written(tmp_path, with_errors=True).items()
    }
    coco, yolo, hf = reports["coco"], reports["yolo"], reports["hf"]

    assert coco["classes"] == yolo["classes"] == hf["classes"] == list(CLASSES)
    assert coco["splits"] == yolo["splits"] == hf["splits"]
    assert coco["splits"]["train"] == {
        "images": 6,
        "images_without_boxes": 1,
        "boxes": 8,  # 10 boxes, less the zero-area one and the one of an unknown class
        "crowd_boxes": 0,
        "boxes_per_class": {"circle": 5, "square": 3, "triangle": 0},
        "classes_without_boxes": ["triangle"],
    }
    assert coco["splits"]["val"]["boxes"] == 8 and coco["splits"]["val"]["images"] == 4

    kinds = {fmt: Counter((p["code"], p["severity"]) for p in r["problems"]) for fmt, r in reports.items()}
    assert (
        kinds["coco"]
        == kinds["yolo"]
        == kinds["hf"]
        == Counter(
            {
                ("unknown_class", "error"): 1,
                ("bad_box_share", "error"): 1,
                ("clipped", "warning"): 1,
                ("degenerate", "warning"): 1,
                ("empty_image", "warning"): 1,
                ("class_without_boxes", "warning"): 1,
                ("shared_images", "warning"): 1,
            }
        )
    )
    for report in reports.values():
        assert report["ok"] is False and (report["errors"], report["warnings"]) == (2, 5)
        warnings = sorted(
            without_examples(p["problem"]) for p in report["problems"] if p["severity"] == "warning"
        )
        assert warnings == sorted(
            without_examples(p["problem"]) for p in coco["problems"] if p["severity"] == "warning"
        )
        clipped = next(p["problem"] for p in report["problems"] if p["code"] == "clipped")
        assert clipped.startswith("6 boxes extended outside their image")
        share = next(p["problem"] for p in report["problems"] if p["code"] == "bad_box_share")
        assert share.startswith("5 of the 8 boxes of the val split lie (partly) outside their image")


def test_reports_and_sanitized_files_agree_on_a_dataset_with_warnings(tmp_path: Path) -> None:
    roots = written(tmp_path, with_errors=False)
    reports = {
        fmt: validate_dataset(
            root, options(fmt), tmp_path / "cache", annotation_max_bytes=ANNOTATION_MAX_BYTES
        )
        for fmt, root in roots.items()
    }
    assert all(r["ok"] for r in reports.values())
    assert reports["coco"]["splits"] == reports["yolo"]["splits"] == reports["hf"]["splits"]
    kinds = {fmt: sorted((p["code"], p["severity"]) for p in r["problems"]) for fmt, r in reports.items()}
    assert (
        kinds["coco"]
        == kinds["yolo"]
        == kinds["hf"]
        == [
            ("class_without_boxes", "warning"),
            ("clipped", "warning"),
            ("degenerate", "warning"),
            ("empty_image", "warning"),
            ("shared_images", "warning"),
        ]
    )
    # The files training reads hold the same boxes, whatever the format.
    boxes: dict[str, list[Any]] = {}
    for fmt, root in roots.items():
        prepared = prepare_dataset(
            root,
            options(fmt),
            tmp_path / f"out-{fmt}",
            tmp_path / "cache",
            annotation_max_bytes=ANNOTATION_MAX_BYTES,
        )
        documents = [json.loads(f.annotation_file.read_text()) for f in (prepared.train, prepared.val)]
        boxes[fmt] = [
            [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in d["annotations"]]
            for d in documents
        ]
        assert [d["problem"] for d in prepared.warning_details] == prepared.warnings
    assert boxes["coco"] == boxes["yolo"] == boxes["hf"]
    assert boxes["coco"][0][3] == (1, 0, [50.0, 40.0, 14.0, 20.0], 0)  # clipped to the 64 px image


@pytest.mark.parametrize("with_errors", [False, True])
def test_every_problem_has_a_known_code(tmp_path: Path, with_errors: bool) -> None:
    for fmt, root in written(tmp_path, with_errors).items():
        for problem in validate_dataset(
            root, options(fmt), tmp_path / "cache", annotation_max_bytes=ANNOTATION_MAX_BYTES
        )["problems"]:
            assert set(problem) == {"file", "problem", "severity", "code"}
            assert problem["code"] in (ERROR_CODES if problem["severity"] == "error" else WARNING_CODES)
