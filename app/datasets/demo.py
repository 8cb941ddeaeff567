"""A generated COCO dataset of drawn shapes, in Roboflow's export layout (and the same data as YOLO or HF).

Used by the test-suite, the benchmarks and `sgjobs demo-dataset`, so that the whole service can be
tried without downloading anything. Only PIL and numpy: no torch.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate: image counts per split, image size range and shapes per image."""

    classes: tuple[str, ...] = DEFAULT_CLASSES
    splits: tuple[tuple[str, int], ...] = (("train", 48), ("valid", 16))
    min_size: int = 96
    max_size: int = 160
    max_objects: int = 3
    roboflow_placeholder: bool = True
    seed: int = 0


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)
    else:
        # Extra class names (tests ask for more classes than three) get a cross.
        width = max(2, (x2 - x1) // 4)
        draw.line([(x1, y1), (x2, y2)], fill=color, width=width)
        draw.line([(x1, y2), (x2, y1)], fill=color, width=width)


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return any(not (box[2] < o[0] or o[2] < box[0] or box[3] < o[1] or o[3] < box[1]) for o in others)


def write_shapes_split(root: Path, split: str, count: int, spec: ShapesSpec, rng: random.Random) -> Path:
    """Write one split (`<root>/<split>/*.jpg` and `_annotations.coco.json`); returns the JSON path."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    offset = 1 if spec.roboflow_placeholder else 0
    categories = [
        {"id": i + offset, "name": name, "supercategory": "shapes" if spec.roboflow_placeholder else "none"}
        for i, name in enumerate(spec.classes)
    ]
    if spec.roboflow_placeholder:
        categories.insert(0, {"id": 0, "name": "shapes", "supercategory": "none"})
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id in range(count):
        width = rng.randint(spec.min_size, spec.max_size)
        height = rng.randint(spec.min_size, spec.max_size)
        background = tuple(rng.randint(0, 80) for _ in range(3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(1, spec.max_objects)):
            side = rng.randint(min(width, height) // 5, min(width, height) // 2)
            for _attempt in range(20):
                x1 = rng.randint(0, width - side - 1)
                y1 = rng.randint(0, height - side - 1)
                box = (x1, y1, x1 + side, y1 + side)
                if not _overlaps(box, placed):
                    break
            else:
                continue
            placed.append(box)
            label = rng.randrange(len(spec.classes))
            color = (rng.randint(150, 255), rng.randint(150, 255), rng.randint(150, 255))
            _draw_shape(draw, spec.classes[label], box, color)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + offset,
                    "bbox": [box[0], box[1], side, side],
                    "area": side * side,
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )
        file_name = f"{split}_{image_id:04d}.jpg"
        image.save(folder / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_shapes_dataset(root: Path, spec: ShapesSpec | None = None) -> Path:
    """Generate a shapes dataset in Roboflow's COCO export layout under `root`; returns `root`."""
    spec = spec or ShapesSpec()
    rng = random.Random(spec.seed)
    for split, count in spec.splits:
        write_shapes_split(root, split, count, spec, rng)
    return root


def _coco_splits(coco_root: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        (folder.name, json.loads((folder / "_annotations.coco.json").read_text()))
        for folder in sorted(coco_root.iterdir())
        if (folder / "_annotations.coco.json").is_file()
    ]


def _class_index(data: dict[str, Any], classes: tuple[str, ...]) -> dict[int, int]:
    return {c["id"]: classes.index(c["name"]) for c in data["categories"] if c["name"] in classes}


def coco_to_yolo(coco_root: Path, root: Path, classes: tuple[str, ...]) -> Path:
    """Convert a generated Roboflow-layout COCO dataset to the Ultralytics layout under `root`.

    `images/<split>/`, `labels/<split>/` (normalised `class cx cy w h`) and `data.yaml`; Roboflow's
    `valid` split becomes `val`. Returns `root`.
    """
    names = {"valid": "val"}
    for split, data in _coco_splits(coco_root):
        target = names.get(split, split)
        (root / "images" / target).mkdir(parents=True, exist_ok=True)
        (root / "labels" / target).mkdir(parents=True, exist_ok=True)
        index = _class_index(data, classes)
        for image in data["images"]:
            shutil.copyfile(
                coco_root / split / image["file_name"], root / "images" / target / image["file_name"]
            )
            w, h = image["width"], image["height"]
            lines = [
                f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}"
                for a in data["annotations"]
                if a["image_id"] == image["id"] and a["category_id"] in index
            ]
            label = (root / "labels" / target / image["file_name"]).with_suffix(".txt")
            label.write_text("".join(line + "\n" for line in lines))
    splits = [names.get(s, s) for s, _ in _coco_splits(coco_root)]
    data_yaml = {"path": ".", "names": list(classes), "nc": len(classes)}
    data_yaml.update({s: f"images/{s}" for s in splits})
    (root / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    return root


def hf_features(classes: Sequence[str]) -> Any:
    """The `datasets.Features` of a detection dataset as the seed's dataset class reads it: `image_id`,
    `image`, `width`, `height` and `objects` with `bbox` (4 floats) and `category` (a ClassLabel of
    `classes`). Needs the `datasets` package (imported here only)."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature
    from datasets import Sequence as SequenceFeature

    return Features(
        {
            "image_id": Value("int64"),
            "image": ImageFeature(),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": SequenceFeature(
                {
                    "bbox": SequenceFeature(Value("float32"), length=4),
                    "category": ClassLabel(names=list(classes)),
                }
            ),
        }
    )


def coco_to_hf(coco_root: Path, root: Path, classes: tuple[str, ...], bbox_format: str = "xywh") -> Path:
    """Convert a generated COCO dataset to a Hugging Face dataset folder under `root`.

    Parquet files `data/<split>-00000-of-00001.parquet` (Roboflow's `valid` becomes `validation`),
    readable with `datasets.load_dataset(root, split=...)`; samples as the seed's dataset class reads
    them, with boxes in `bbox_format` pixels. Needs the `datasets` package (imported here only).
    """
    from datasets import Dataset

    features = hf_features(classes)
    names = {"valid": "validation"}
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, data in _coco_splits(coco_root):
        index = _class_index(data, classes)
        rows: dict[str, list[Any]] = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
        for image in data["images"]:
            boxes, labels = [], []
            for a in data["annotations"]:
                if a["image_id"] != image["id"] or a["category_id"] not in index:
                    continue
                x, y, w, h = a["bbox"]
                boxes.append(
                    {
                        "xywh": [x, y, w, h],
                        "xyxy": [x, y, x + w, y + h],
                        "cxcywh": [x + w / 2, y + h / 2, w, h],
                    }[bbox_format]
                )
                labels.append(index[a["category_id"]])
            rows["image_id"].append(image["id"])
            rows["image"].append(
                {"bytes": (coco_root / split / image["file_name"]).read_bytes(), "path": None}
            )
            rows["width"].append(image["width"])
            rows["height"].append(image["height"])
            rows["objects"].append({"bbox": boxes, "category": labels})
        dataset = Dataset.from_dict(rows, features=features)
        dataset.to_parquet(str(root / "data" / f"{names.get(split, split)}-00000-of-00001.parquet"))
    return root


def write_shapes_yolo(root: Path, spec: ShapesSpec | None = None) -> Path:
    """The same shapes as `write_shapes_dataset(spec)`, in the Ultralytics YOLO layout under `root`."""
    spec = spec or ShapesSpec()
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_dataset(Path(tmp), spec)
        return coco_to_yolo(Path(tmp), root, spec.classes)


def write_shapes_hf(root: Path, spec: ShapesSpec | None = None, bbox_format: str = "xywh") -> Path:
    """The same shapes as `write_shapes_dataset(spec)`, as a Hugging Face parquet dataset under `root`."""
    spec = spec or ShapesSpec()
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_dataset(Path(tmp), spec)
        return coco_to_hf(Path(tmp), root, spec.classes, bbox_format)
