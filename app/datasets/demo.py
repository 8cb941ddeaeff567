"""A generated COCO dataset of drawn shapes, in Roboflow's export layout.

Used by the test-suite, the benchmarks and `sgjobs demo-dataset`, so that the whole service can be
tried without downloading anything. Only PIL and numpy: no torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

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
