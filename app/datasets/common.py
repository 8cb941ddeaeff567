"""What the YOLO and Hugging Face readers share: images with pixel boxes in, sanitized COCO out.

Each format reader checks what is specific to it (label files that do not parse, class ids that are
not classes, duplicate image ids) and hands over `ImageRecord`s with boxes already in pixel XYXY.
`build_split` then does what COCO's validator does (real image sizes, clipping, dropping boxes without
area, per-class counts) and produces the same sanitized COCO document, so training, metrics and
prediction are identical for every format. Problems go to the COCO validator's collector, so every
format reports them in the same shape: `{"file", "problem", "severity"}`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.datasets.coco import (
    CLIP_TOLERANCE,
    PreparedDataset,
    SplitStats,
    _Problems,
    _read_image_header,
    _write_json_atomic,
)
from app.ml.types import SplitFiles

# More dropped or clipped boxes than this share of a split is not noise: the box format is wrong.
MAX_BAD_BOX_SHARE = 0.5
MIN_BOXES_FOR_SHARE_CHECK = 5

Problems = _Problems


@dataclass
class Box:
    """One box in pixels (XYXY), its class index and where it came from (for messages)."""

    label: int
    x1: float
    y1: float
    x2: float
    y2: float
    where: str


@dataclass
class ImageRecord:
    """One image of a split: its file (relative to the split's images folder) and its boxes."""

    image_id: int
    file_name: str
    path: Path
    shown: str  # how messages name the image
    declared_size: tuple[int, int] | None = None
    boxes: list[Box] = field(default_factory=list)


@dataclass
class SplitResult:
    """A checked split: its sanitized COCO document, counts and the real image paths."""

    coco: dict[str, Any]
    stats: SplitStats
    image_paths: set[Path]
    images_dir: Path


def read_image(record: ImageRecord, problems: Problems) -> tuple[int, int] | None:
    """The image's real size (as training sees it), or None with an error recorded."""
    if not record.path.is_file():
        problems.error(record.shown, "image file does not exist")
        return None
    info = _read_image_header(record.path)
    if isinstance(info, str):
        problems.error(record.shown, info)
        return None
    if info.exif_rotated:
        problems.warn("exif_rotated", record.shown)
    if record.declared_size is not None and record.declared_size != (info.width, info.height):
        problems.warn("size_mismatch", f"{record.shown} is {info.width}x{info.height}")
    return info.width, info.height


def build_split(
    name: str,
    source: str,
    records: list[ImageRecord],
    images_dir: Path,
    class_names: tuple[str, ...],
    problems: Problems,
    sizes: dict[int, tuple[int, int]] | None = None,
) -> SplitResult:
    """Clip and filter boxes against the real image sizes; the sanitized COCO document of one split.

    `sizes` may give image sizes already read (image id -> (width, height)); other images are read here.
    `source` names the split's origin in messages (a folder, a file, a split name).
    """
    if not records:
        problems.error(source, f"the {name} split has no images")
    images_out: list[dict[str, Any]] = []
    annotations_out: list[dict[str, Any]] = []
    per_class: Counter[int] = Counter()
    empty = 0
    bad = 0
    total = 0
    paths: set[Path] = set()
    for record in records:
        size = (sizes or {}).get(record.image_id) or read_image(record, problems)
        if size is None:
            continue
        width, height = size
        images_out.append(
            {"id": record.image_id, "file_name": record.file_name, "width": width, "height": height}
        )
        paths.add(record.path.resolve())
        kept = 0
        for box in record.boxes:
            total += 1
            cx1, cy1 = min(max(box.x1, 0.0), width), min(max(box.y1, 0.0), height)
            cx2, cy2 = min(max(box.x2, 0.0), width), min(max(box.y2, 0.0), height)
            if cx2 <= cx1 or cy2 <= cy1:
                problems.warn("degenerate", box.where)
                bad += 1
                continue
            if (
                max(abs(cx1 - box.x1), abs(cy1 - box.y1), abs(cx2 - box.x2), abs(cy2 - box.y2))
                > CLIP_TOLERANCE
            ):
                problems.warn("clipped", box.where)
                bad += 1
            w, h = cx2 - cx1, cy2 - cy1
            annotations_out.append(
                {
                    "id": len(annotations_out) + 1,
                    "image_id": record.image_id,
                    "category_id": box.label,
                    "bbox": [cx1, cy1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            per_class[box.label] += 1
            kept += 1
        if not kept:
            empty += 1
            problems.warn("empty_image", record.shown)
    if total >= MIN_BOXES_FOR_SHARE_CHECK and bad > MAX_BAD_BOX_SHARE * total:
        problems.error(
            source,
            f"{bad} of the {total} boxes of the {name} split lie (partly) outside their image or have no "
            "area: the box format is probably wrong (check bbox_format, or that YOLO labels are "
            "normalised to 0..1)",
        )
    stats = SplitStats(
        images=len(images_out),
        images_without_boxes=empty,
        boxes=len(annotations_out),
        crowd_boxes=0,
        boxes_per_class={n: per_class[i] for i, n in enumerate(class_names)},
        classes_without_boxes=[n for i, n in enumerate(class_names) if not per_class[i]],
    )
    coco = {
        "info": {"description": f"sanitized {name} split of {source}"},
        "images": images_out,
        "annotations": annotations_out,
        "categories": [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(class_names)],
    }
    return SplitResult(coco=coco, stats=stats, image_paths=paths, images_dir=images_dir)


def finish(
    class_names: tuple[str, ...],
    train: SplitResult | None,
    val: SplitResult | None,
    problems: Problems,
    out_dir: Path,
    train_source: str,
) -> PreparedDataset:
    """Cross-split checks, then raise with every problem or write `out_dir/{train,val}.json`."""
    if not class_names:
        problems.error(train_source, "no class names, so there are no classes to train")
    if train is not None and class_names:
        if train.stats.boxes == 0 and train.stats.images:
            problems.error(train_source, "the training split has no usable boxes")
        for name in train.stats.classes_without_boxes:
            problems.warn("class_without_boxes", f'"{name}"')
        if val is not None:
            for shared in sorted(val.image_paths & train.image_paths):
                problems.warn("shared_images", shared.name)
    stats = {n: r.stats for n, r in (("train", train), ("val", val)) if r is not None}
    problems.raise_if_errors(class_names, stats)
    assert train is not None and val is not None
    out_dir = out_dir.resolve()
    train_file, val_file = out_dir / "train.json", out_dir / "val.json"
    _write_json_atomic(train_file, train.coco)
    _write_json_atomic(val_file, val.coco)
    return PreparedDataset(
        class_names=class_names,
        train=SplitFiles(
            images_dir=train.images_dir, annotation_file=train_file, num_images=train.stats.images
        ),
        val=SplitFiles(images_dir=val.images_dir, annotation_file=val_file, num_images=val.stats.images),
        warnings=problems.warning_messages(),
        stats={"train": train.stats, "val": val.stats},
    )
