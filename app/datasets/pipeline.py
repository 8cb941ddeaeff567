"""What every dataset format shares: images with pixel boxes in, checked splits and sanitized COCO out.

Each format reader (`coco`, `yolo`, `hf`) checks only what is specific to it (finding its splits,
parsing its files, mapping its categories or class ids) and hands over `ImageRecord`s with boxes
already in pixel XYXY. `build_split` then applies the same rules to every format: real image sizes
(read from the file's header, after EXIF rotation), boxes clipped to their image, boxes without area
dropped, the bad-box-share check, per-class counts; and `finish` does the checks across splits and
writes the sanitized COCO files that training, metrics and prediction read. Problems are collected by
`app.datasets.problems.Problems`, so every format reports them with the same texts and codes.

Pure Python (json + PIL header reads): no torch, no super-gradients, fast enough for 10k images.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeGuard

from PIL import Image

from app.datasets.problems import ErrorCode, Problems
from app.ml.types import SplitFiles
from app.paths import is_inside, real

# Training reads images with cv2.imread; these are the PIL formats OpenCV decodes too.
TRAINABLE_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"})
# Below this many pixels a box sticking out of its image is float noise, not worth a warning.
CLIP_TOLERANCE = 0.01
# More dropped or clipped boxes than this share of a split is not noise: the box format is wrong.
MAX_BAD_BOX_SHARE = 0.5
MIN_BOXES_FOR_SHARE_CHECK = 5
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_AXES = frozenset({5, 6, 7, 8})
_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
# Archivers add these next to the dataset's own folder.
_IGNORED_TOP_LEVEL = frozenset({"__MACOSX"})


def single_subfolder(root: Path) -> Path | None:
    """The only folder in `root` when an archive wrapped the dataset in one top-level folder."""
    try:
        entries = [
            e for e in root.iterdir() if not e.name.startswith(".") and e.name not in _IGNORED_TOP_LEVEL
        ]
    except OSError:
        return None
    folders = [e for e in entries if e.is_dir() and not e.is_symlink()]
    if len(folders) == 1 and len(entries) == 1:
        return folders[0]
    return None


def is_int(value: object) -> TypeGuard[int]:
    """An integer, but not a bool (JSON true arrives as bool, a subclass of int: an id of `true` is a bug)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """Counts for one split, after sanitizing (dropped boxes are not counted)."""

    images: int = 0
    images_without_boxes: int = 0
    boxes: int = 0
    crowd_boxes: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    classes_without_boxes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "images": self.images,
            "images_without_boxes": self.images_without_boxes,
            "boxes": self.boxes,
            "crowd_boxes": self.crowd_boxes,
            "boxes_per_class": dict(self.boxes_per_class),
            "classes_without_boxes": list(self.classes_without_boxes),
        }


@dataclass
class PreparedDataset:
    """A validated dataset: class names, sanitized split files, warnings and per-split stats.

    `warnings` are the warning texts; `warning_details` the same warnings as report problems
    (`{"file", "problem", "severity", "code"}`).
    """

    class_names: tuple[str, ...]
    train: SplitFiles
    val: SplitFiles
    warnings: list[str]
    stats: dict[str, SplitStats]
    warning_details: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for storing on a dataset or job record)."""
        return {
            "class_names": list(self.class_names),
            "warnings": list(self.warnings),
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }


# --------------------------------------------------------------------------------------------------
# Image headers
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    """An image as training will see it: size after EXIF rotation, and its PIL format."""

    width: int
    height: int
    format: str
    exif_rotated: bool


class ImageFault(NamedTuple):
    """Why an image cannot be trained on."""

    code: ErrorCode
    text: str


def read_image_header(source: Path | IO[bytes]) -> ImageInfo | ImageFault:
    """Size as training will see it (after EXIF rotation), or why not. Reads the header only."""
    try:
        with Image.open(source) as image:
            fmt = image.format or "unknown"
            width, height = image.size
            orientation = None
            if fmt in _EXIF_FORMATS and "exif" in image.info:
                exif = Image.Exif()
                try:
                    exif.load(image.info["exif"])
                    orientation = exif.get(_EXIF_ORIENTATION)
                except Exception:  # a broken EXIF block is no reason to refuse the image
                    orientation = None
    except Image.DecompressionBombError:
        return ImageFault("unreadable_image", "image is too large to be decoded safely")
    except Exception as exc:  # PIL raises many types for garbage: all mean "not an image"
        return ImageFault("unreadable_image", f"not a readable image ({type(exc).__name__})")
    if fmt not in TRAINABLE_FORMATS:
        return ImageFault(
            "unsupported_image",
            f"image format {fmt} is not supported for training (use JPEG, PNG, BMP, TIFF or WebP)",
        )
    if width <= 0 or height <= 0:
        return ImageFault("unreadable_image", "image has no pixels")
    # OpenCV (used by training) applies the EXIF orientation, so the trained image is rotated.
    if orientation in _EXIF_SWAPS_AXES:
        width, height = height, width
    return ImageInfo(width, height, fmt, exif_rotated=orientation not in (None, 1))


# --------------------------------------------------------------------------------------------------
# Records and splits
# --------------------------------------------------------------------------------------------------


@dataclass
class Box:
    """One box in pixels (XYXY), its class index, and where it is among its image's annotations.

    `ref` completes the image's `shown` name in warnings ("annotation id 7", "label line 3", "box 0").
    """

    label: int
    x1: float
    y1: float
    x2: float
    y2: float
    ref: str
    crowd: bool = False


@dataclass
class ImageRecord:
    """One image of a split: its file (relative to the split's images folder) and its boxes.

    `shown` names the image in every message about it; `context` (e.g. "image id 2 in
    train/_annotations.coco.json") is added to errors about the image file. `identity` is what makes
    an image of the validation split the same as one of the training split: its real path unless the
    reader knows better (Hugging Face images are copies, identified by content). `checked` is set
    once the image file has been read (by `read_image`), `size` when that succeeded.
    """

    image_id: int
    file_name: str
    path: Path
    shown: str
    context: str = ""
    declared_size: tuple[float, float] | None = None
    identity: str | None = None
    checked: bool = False
    size: tuple[int, int] | None = None
    boxes: list[Box] = field(default_factory=list)


@dataclass
class SplitResult:
    """A checked split: its sanitized COCO document, counts, and its images by identity (-> shown)."""

    coco: dict[str, Any]
    stats: SplitStats
    identities: dict[str, str]
    images_dir: Path


def declared_size(width: object, height: object) -> tuple[float, float] | None:
    """A width and height from annotations, when both are numbers (otherwise there is nothing to compare)."""
    if is_number(width) and is_number(height):
        return float(width), float(height)
    return None


def read_image(record: ImageRecord, problems: Problems, inside: Path) -> tuple[int, int] | None:
    """The image's real size (as training sees it), or None with an error recorded.

    The image file must lie in `inside` (the dataset root, or the folder images were extracted to),
    symlinks followed.
    """
    record.checked = True
    context = f" ({record.context})" if record.context else ""
    if not is_inside(record.path, inside):
        problems.error(record.shown, f"image links outside the dataset{context}", "outside_dataset")
        return None
    if not record.path.is_file():
        problems.error(record.shown, f"image file does not exist{context}", "missing_image")
        return None
    info = read_image_header(record.path)
    if isinstance(info, ImageFault):
        problems.error(record.shown, f"{info.text}{context}", info.code)
        return None
    if info.exif_rotated:
        problems.warn("exif_rotated", record.shown)
    if record.declared_size is not None and record.declared_size != (info.width, info.height):
        problems.warn("size_mismatch", f"{record.shown} is {info.width}x{info.height}")
    record.size = (info.width, info.height)
    return record.size


def build_split(
    name: str,
    source: str,
    records: list[ImageRecord],
    images_dir: Path,
    class_names: tuple[str, ...],
    problems: Problems,
    *,
    inside: Path,
    box_hint: str,
) -> SplitResult:
    """Clip and filter boxes against the real image sizes; the sanitized COCO document of one split.

    Images not read yet (`record.checked` is false) are read here; they must lie in `inside`. `source`
    names the split's origin in messages (an annotation file, folders, a split name); `box_hint` says
    how this format's boxes should look, for the error when most boxes do not fit their image.
    """
    if not records:
        problems.error(source, f"the {name} split has no images", "empty_split")
    images_out: list[dict[str, Any]] = []
    annotations_out: list[dict[str, Any]] = []
    per_class: Counter[int] = Counter()
    empty = crowd = bad = total = 0
    identities: dict[str, str] = {}
    for record in records:
        size = record.size if record.checked else read_image(record, problems, inside)
        if size is None:
            continue
        width, height = size
        images_out.append(
            {"id": record.image_id, "file_name": record.file_name, "width": width, "height": height}
        )
        identities[record.identity or str(real(record.path))] = record.shown
        kept = 0
        for box in record.boxes:
            total += 1
            cx1, cy1 = min(max(box.x1, 0.0), width), min(max(box.y1, 0.0), height)
            cx2, cy2 = min(max(box.x2, 0.0), width), min(max(box.y2, 0.0), height)
            if cx2 <= cx1 or cy2 <= cy1:
                problems.warn("degenerate", f"{record.shown} {box.ref}")
                bad += 1
                continue
            if (
                max(abs(cx1 - box.x1), abs(cy1 - box.y1), abs(cx2 - box.x2), abs(cy2 - box.y2))
                > CLIP_TOLERANCE
            ):
                problems.warn("clipped", f"{record.shown} {box.ref}")
                bad += 1
            w, h = cx2 - cx1, cy2 - cy1
            annotations_out.append(
                {
                    "id": len(annotations_out) + 1,
                    "image_id": record.image_id,
                    "category_id": box.label,
                    "bbox": [cx1, cy1, w, h],
                    "area": w * h,
                    "iscrowd": int(box.crowd),
                }
            )
            per_class[box.label] += 1
            crowd += int(box.crowd)
            kept += 1
        if not kept:
            empty += 1
            problems.warn("empty_image", record.shown)
    if total >= MIN_BOXES_FOR_SHARE_CHECK and bad > MAX_BAD_BOX_SHARE * total:
        problems.error(
            source,
            f"{bad} of the {total} boxes of the {name} split lie (partly) outside their image or have no "
            f"area: the box format is probably wrong ({box_hint})",
            "bad_box_share",
        )
    stats = SplitStats(
        images=len(images_out),
        images_without_boxes=empty,
        boxes=len(annotations_out),
        crowd_boxes=crowd,
        boxes_per_class={n: per_class[i] for i, n in enumerate(class_names)},
        classes_without_boxes=[n for i, n in enumerate(class_names) if not per_class[i]],
    )
    coco = {
        "info": {"description": f"sanitized {name} split of {source}"},
        "images": images_out,
        "annotations": annotations_out,
        "categories": [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(class_names)],
    }
    return SplitResult(coco=coco, stats=stats, identities=identities, images_dir=images_dir)


def finish(
    class_names: tuple[str, ...],
    train: SplitResult | None,
    val: SplitResult | None,
    problems: Problems,
    out_dir: Path,
    train_source: str,
) -> PreparedDataset:
    """Cross-split checks, then raise with every problem or write `out_dir/{train,val}.json`.

    A split that could not be read at all is None (its errors are already recorded).
    """
    if train is not None and not class_names:
        problems.error(train_source, "has no classes, so there is nothing to train", "no_classes")
    if train is not None and class_names:
        if train.stats.boxes == 0 and train.stats.images:
            problems.error(train_source, "the training split has no usable boxes", "no_boxes")
        for name in train.stats.classes_without_boxes:
            problems.warn("class_without_boxes", f'"{name}"')
        if val is not None:
            # Validation on training images overstates mAP; worth knowing, not worth refusing.
            shared = val.identities.keys() & train.identities.keys()
            for shown in sorted(val.identities[key] for key in shared):
                problems.warn("shared_images", shown)
    stats = {n: r.stats for n, r in (("train", train), ("val", val)) if r is not None}
    problems.raise_if_errors(class_names, stats)
    assert train is not None and val is not None
    out_dir = out_dir.resolve()
    train_file, val_file = out_dir / "train.json", out_dir / "val.json"
    write_json_atomic(train_file, train.coco)
    write_json_atomic(val_file, val.coco)
    details = problems.warning_details()
    return PreparedDataset(
        class_names=class_names,
        train=SplitFiles(
            images_dir=train.images_dir, annotation_file=train_file, num_images=train.stats.images
        ),
        val=SplitFiles(images_dir=val.images_dir, annotation_file=val_file, num_images=val.stats.images),
        warnings=[d["problem"] for d in details],
        stats={"train": train.stats, "val": val.stats},
        warning_details=details,
    )


def annotation_too_large(path: Path, annotation_max_bytes: int) -> str | None:
    """Why the annotation file at `path` must not be parsed (it is larger than the setting), or None.

    Checked before the file is opened: a parser holds many times the file's size in memory.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return None  # reading it reports the problem
    if size <= annotation_max_bytes:
        return None
    return (
        f"is {size} bytes, larger than annotation_max_bytes ({annotation_max_bytes} bytes); "
        "split the annotations or raise SGJOBS_ANNOTATION_MAX_BYTES"
    )


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so no reader ever sees half a file."""
    # A half-written annotation file would be read by a later training run as a corrupt dataset.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
