"""Validate a COCO detection dataset and write sanitized annotation files for super-gradients.

super-gradients' `COCOFormatDetectionDataset` trusts its input: a missing image fails mid-epoch, an
annotation whose `category_id` is not among the categories silently shifts the labels of later boxes,
and the `width`/`height` in the JSON (not the file's) drive box clipping. Everything is therefore
checked here, up front, and training only ever sees the sanitized files written by
`prepare_coco_dataset`: category ids 0..n-1 in class order, real image sizes, clipped boxes.

Pure Python (json + PIL header reads): no torch, no super-gradients, fast enough for 10k images.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from PIL import Image

from app.errors import DatasetError
from app.ml.types import SplitFiles

ROBOFLOW_ANNOTATION_FILE = "_annotations.coco.json"
# Roboflow exports the validation split as "valid"; other tools use "val"; a dataset with only a
# test split still has something to validate on.
ROBOFLOW_VAL_FOLDERS: tuple[str, ...] = ("valid", "val", "test")
MAX_ERRORS = 50
MAX_EXAMPLES = 3
# Training reads images with cv2.imread; these are the PIL formats OpenCV decodes too.
TRAINABLE_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"})
# Below this many pixels a box sticking out of its image is float noise, not worth a warning.
CLIP_TOLERANCE = 0.01
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_AXES = frozenset({5, 6, 7, 8})
_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
_IGNORED_TOP_LEVEL = frozenset({"__MACOSX"})


@dataclass(frozen=True)
class SplitRef:
    """Where one split lives, both paths relative to the dataset root."""

    images: str
    annotations: str


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
    """A validated dataset: class names, sanitized split files, warnings and per-split stats."""

    class_names: tuple[str, ...]
    train: SplitFiles
    val: SplitFiles
    warnings: list[str]
    stats: dict[str, SplitStats]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for storing on a dataset or job record)."""
        return {
            "class_names": list(self.class_names),
            "warnings": list(self.warnings),
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }


# --------------------------------------------------------------------------------------------------
# Split resolution
# --------------------------------------------------------------------------------------------------


def _roboflow_split(root: Path, folder: str) -> SplitRef | None:
    if (root / folder / ROBOFLOW_ANNOTATION_FILE).is_file():
        return SplitRef(images=folder, annotations=f"{folder}/{ROBOFLOW_ANNOTATION_FILE}")
    return None


def _classic_split(root: Path, prefix: str) -> SplitRef | None:
    """`annotations/instances_<prefix>*.json` with its images in `images/<suffix>`, `<suffix>` or `images`."""
    candidates = sorted((root / "annotations").glob(f"instances_{prefix}*.json"))
    if len(candidates) != 1:
        # Several matches (e.g. train2014 and train2017) are ambiguous: the caller must pick.
        return None
    annotation = candidates[0]
    suffix = annotation.stem[len("instances_") :]
    for images in (f"images/{suffix}", suffix, "images"):
        if (root / images).is_dir():
            return SplitRef(images=images, annotations=f"annotations/{annotation.name}")
    return None


def _find_train(root: Path) -> SplitRef | None:
    return _roboflow_split(root, "train") or _classic_split(root, "train")


def _find_val(root: Path) -> SplitRef | None:
    for folder in ROBOFLOW_VAL_FOLDERS:
        found = _roboflow_split(root, folder)
        if found is not None:
            return found
    return _classic_split(root, "val")


def _single_subfolder(root: Path) -> Path | None:
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


def _prefixed(ref: SplitRef, prefix: str) -> SplitRef:
    return SplitRef(images=f"{prefix}/{ref.images}", annotations=f"{prefix}/{ref.annotations}")


def _looked_for_train() -> list[str]:
    return [
        f"train/{ROBOFLOW_ANNOTATION_FILE} (Roboflow COCO export)",
        "annotations/instances_train*.json with images in images/train*, train* or images (COCO layout)",
    ]


def _looked_for_val() -> list[str]:
    roboflow = [f"{folder}/{ROBOFLOW_ANNOTATION_FILE}" for folder in ROBOFLOW_VAL_FOLDERS]
    return [
        f"{', '.join(roboflow)} (Roboflow COCO export)",
        "annotations/instances_val*.json with images in images/val*, val* or images (COCO layout)",
    ]


def resolve_coco_splits(
    root: Path, train: SplitRef | None, val: SplitRef | None
) -> tuple[SplitRef, SplitRef]:
    """Fill in the splits the caller did not name, from Roboflow's export layout or COCO's own.

    Roboflow: `train/_annotations.coco.json` (images beside it) and, for validation, the first of
    `valid/`, `val/`, `test/`. COCO: one `annotations/instances_train*.json` and one
    `annotations/instances_val*.json`, images in `images/<name>`, `<name>` or `images`. A dataset
    wrapped in a single top-level folder (as many zip files are) is looked into.
    Raises `DatasetError` listing what was looked for when a split cannot be found.
    """
    _check_ref_inside(root, train, "train")
    _check_ref_inside(root, val, "val")
    if train is not None and val is not None:
        return train, val

    base, prefix = root, ""
    if _find_train(root) is None and train is None:
        inner = _single_subfolder(root)
        if inner is not None and _find_train(inner) is not None:
            base, prefix = inner, inner.name

    def found(ref: SplitRef | None) -> SplitRef | None:
        return _prefixed(ref, prefix) if ref is not None and prefix else ref

    resolved_train = train or found(_find_train(base))
    resolved_val = val or found(_find_val(base))
    details: list[dict[str, str]] = []
    if resolved_train is None:
        details.append(
            {
                "file": ".",
                "problem": "no training split found; looked for " + "; ".join(_looked_for_train()),
                "severity": "error",
            }
        )
    if resolved_val is None:
        details.append(
            {
                "file": ".",
                "problem": "no validation split found; looked for " + "; ".join(_looked_for_val()),
                "severity": "error",
            }
        )
    if details:
        raise DatasetError(
            "Could not find the dataset's splits: " + " ".join(d["problem"] + "." for d in details),
            details=details,
        )
    assert resolved_train is not None and resolved_val is not None
    return resolved_train, resolved_val


def _check_ref_inside(root: Path, ref: SplitRef | None, split: str) -> None:
    if ref is None:
        return
    bad = [p for p in (ref.images, ref.annotations) if _unsafe_relative(p)]
    if bad:
        details = [
            {
                "file": p,
                "problem": f"{split} path must be relative and stay inside the dataset",
                "severity": "error",
            }
            for p in bad
        ]
        raise DatasetError(f"The {split} split points outside the dataset: {', '.join(bad)}", details=details)


# --------------------------------------------------------------------------------------------------
# Problem collection
# --------------------------------------------------------------------------------------------------

# kind -> (text for one, text for several with {n}); examples are appended.
_WARNING_TEXTS: dict[str, tuple[str, str]] = {
    "clipped": (
        "1 box extended outside its image and was clipped",
        "{n} boxes extended outside their image and were clipped",
    ),
    "degenerate": (
        "1 box had zero or negative area (after clipping) and was dropped",
        "{n} boxes had zero or negative area (after clipping) and were dropped",
    ),
    "empty_image": ("1 image has no boxes", "{n} images have no boxes"),
    "size_mismatch": (
        "1 image has a width/height in its annotation file that differs from the file; "
        "the file's size is used",
        "{n} images have a width/height in their annotation file that differs from the file; "
        "the files' sizes are used",
    ),
    "exif_rotated": (
        "1 image carries an EXIF rotation, which training applies: "
        "check that its boxes match the rotated image",
        "{n} images carry an EXIF rotation, which training applies: "
        "check that their boxes match the rotated images",
    ),
    "unknown_empty_category": (
        "1 category with no boxes is not a training class and was ignored",
        "{n} categories with no boxes are not training classes and were ignored",
    ),
    "class_without_boxes": (
        "1 class has no boxes in the training split",
        "{n} classes have no boxes in the training split",
    ),
    "orphan_label": (
        "1 label file has no image and was ignored",
        "{n} label files have no image and were ignored",
    ),
    "shared_images": (
        "1 validation image is also in the training split",
        "{n} validation images are also in the training split",
    ),
}


@dataclass
class _Warning:
    count: int = 0
    examples: list[str] = field(default_factory=list)


class InvalidDataset(DatasetError):
    """A `DatasetError` from validation, with what was counted before the errors were raised."""

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        class_names: tuple[str, ...] = (),
        stats: dict[str, SplitStats] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.class_names = class_names
        self.stats = stats or {}


class _Problems:
    """Collects errors (capped) and aggregated warnings, so the user sees every problem at once."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.error_count = 0
        self._warnings: dict[str, _Warning] = {}

    def error(self, file: str, problem: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"file": file, "problem": problem, "severity": "error"})

    def warn(self, kind: str, example: str) -> None:
        entry = self._warnings.setdefault(kind, _Warning())
        entry.count += 1
        if len(entry.examples) < MAX_EXAMPLES:
            entry.examples.append(example)

    def warning_messages(self) -> list[str]:
        messages = []
        for kind, entry in self._warnings.items():
            one, many = _WARNING_TEXTS[kind]
            text = one if entry.count == 1 else many.format(n=entry.count)
            if entry.examples:
                more = ", ..." if entry.count > len(entry.examples) else ""
                text += f" (e.g. {', '.join(entry.examples)}{more})"
            messages.append(text)
        return messages

    def raise_if_errors(
        self, class_names: tuple[str, ...] = (), stats: dict[str, SplitStats] | None = None
    ) -> None:
        if not self.error_count:
            return
        shown = "; ".join(f"{e['file']}: {e['problem']}" for e in self.errors[:3])
        rest = self.error_count - min(3, len(self.errors))
        message = f"The dataset has {self.error_count} problem{'s' if self.error_count > 1 else ''}: {shown}"
        if rest:
            message += f" (and {rest} more)"
        details: list[dict[str, str]] = list(self.errors)
        if self.error_count > len(self.errors):
            details.append(
                {
                    "file": ".",
                    "problem": f"{self.error_count - len(self.errors)} more errors not listed",
                    "severity": "error",
                }
            )
        details += [{"file": ".", "problem": w, "severity": "warning"} for w in self.warning_messages()]
        raise InvalidDataset(message, details=details, class_names=class_names, stats=stats)


# --------------------------------------------------------------------------------------------------
# Loading and validating
# --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as bool, a subclass of int: an id of `true` is a bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unsafe_relative(name: str) -> bool:
    """True for names that could leave their folder: absolute, `..` parts, NUL bytes, empty."""
    if not name or "\x00" in name:
        return True
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts or name.startswith("\\")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


@dataclass
class _Category:
    id: int
    name: str
    supercategory: str | None


@dataclass
class _LoadedSplit:
    name: str
    rel_file: str  # annotation file relative to the root, for messages
    images_rel: str
    images_dir: Path  # resolved
    categories: list[_Category]
    images: list[Any]
    annotations: list[Any]


def _load_split(root: Path, name: str, ref: SplitRef, problems: _Problems) -> _LoadedSplit | None:
    """Read one split's JSON and check its shape; None (with errors recorded) if unusable."""
    rel_file = str(PurePosixPath(ref.annotations))
    ok = True
    for rel in (ref.annotations, ref.images):
        if _unsafe_relative(rel):
            problems.error(rel, f"{name} split path must be relative and stay inside the dataset")
            ok = False
    if not ok:
        return None
    annotation_path = (root / ref.annotations).resolve()
    images_dir = (root / ref.images).resolve()
    if not _is_within(annotation_path, root) or not _is_within(images_dir, root):
        problems.error(rel_file, f"{name} split links outside the dataset")
        return None
    if not images_dir.is_dir():
        problems.error(ref.images, f"images folder of the {name} split does not exist")
        ok = False
    if not annotation_path.is_file():
        problems.error(rel_file, f"annotation file of the {name} split does not exist")
        return None
    try:
        with annotation_path.open("rb") as f:
            data = json.load(f)
    except OSError as exc:
        problems.error(rel_file, f"cannot be read: {exc.strerror or exc}")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.error(rel_file, f"is not valid JSON: {exc}")
        return None
    except RecursionError:
        problems.error(rel_file, "is not valid JSON: nested too deeply")
        return None
    if not isinstance(data, dict):
        problems.error(rel_file, f"top level must be a JSON object, got {type(data).__name__}")
        return None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            problems.error(rel_file, f'missing key "{key}"')
            ok = False
        elif not isinstance(data[key], list):
            problems.error(rel_file, f'"{key}" must be a list, got {type(data[key]).__name__}')
            ok = False
    if not ok:
        return None

    categories: list[_Category] = []
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for index, raw in enumerate(data["categories"]):
        where = f"category #{index}"
        if not isinstance(raw, dict):
            problems.error(rel_file, f"{where} must be an object")
            continue
        cat_id, cat_name = raw.get("id"), raw.get("name")
        if not _is_int(cat_id):
            problems.error(rel_file, f"{where} has a non-integer id {cat_id!r}")
            continue
        if not isinstance(cat_name, str) or not cat_name.strip():
            problems.error(rel_file, f"category id {cat_id} has no name")
            continue
        if cat_id in seen_ids:
            problems.error(rel_file, f"category id {cat_id} appears twice")
            continue
        if cat_name in seen_names:
            problems.error(rel_file, f'category name "{cat_name}" appears twice')
            continue
        seen_ids.add(cat_id)
        seen_names.add(cat_name)
        supercategory = raw.get("supercategory")
        categories.append(
            _Category(cat_id, cat_name, supercategory if isinstance(supercategory, str) else None)
        )
    categories.sort(key=lambda c: c.id)
    return _LoadedSplit(
        name=name,
        rel_file=rel_file,
        images_rel=str(PurePosixPath(ref.images)),
        images_dir=images_dir,
        categories=categories,
        images=data["images"],
        annotations=data["annotations"],
    )


def _annotated_names(split: _LoadedSplit) -> Counter[str]:
    """How many annotations each category name has (before any validation of the annotations)."""
    by_id = Counter(a.get("category_id") for a in split.annotations if isinstance(a, dict))
    return Counter({c.name: by_id.get(c.id, 0) for c in split.categories})


def _placeholder(categories: list[_Category], counts: Counter[str]) -> _Category | None:
    """Roboflow's placeholder: no annotations anywhere and the supercategory of every other category."""
    for cat in categories:
        others = [c for c in categories if c is not cat]
        if counts.get(cat.name, 0) == 0 and others and all(c.supercategory == cat.name for c in others):
            return cat
    return None


@dataclass
class _ImageInfo:
    width: int
    height: int
    exif_rotated: bool


def _read_image_header(path: Path) -> _ImageInfo | str:
    """Size as training will see it (after EXIF rotation), or an error text. Reads the header only."""
    try:
        with Image.open(path) as image:
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
        return "image is too large to be decoded safely"
    except Exception as exc:  # PIL raises many types for garbage: all mean "not an image"
        return f"not a readable image ({type(exc).__name__})"
    if fmt not in TRAINABLE_FORMATS:
        return f"image format {fmt} is not supported for training (use JPEG, PNG, BMP, TIFF or WebP)"
    if width <= 0 or height <= 0:
        return "image has no pixels"
    # OpenCV (used by training) applies the EXIF orientation, so the trained image is rotated.
    if orientation in _EXIF_SWAPS_AXES:
        width, height = height, width
    return _ImageInfo(width, height, exif_rotated=orientation not in (None, 1))


@dataclass
class _SplitResult:
    coco: dict[str, Any]
    stats: SplitStats
    image_paths: set[Path]


def _process_split(
    split: _LoadedSplit,
    root: Path,
    class_names: tuple[str, ...],
    category_to_class: dict[int, int],
    problems: _Problems,
    skip_category_ids: frozenset[int] = frozenset(),
) -> _SplitResult:
    """Check images and annotations of one split; build its sanitized COCO document."""
    rel_file = split.rel_file
    if not split.images:
        problems.error(rel_file, f"the {split.name} split has no images")

    images_out: list[dict[str, Any]] = []
    sizes: dict[int, tuple[int, int]] = {}
    image_names: dict[int, str] = {}
    image_paths: set[Path] = set()
    seen_image_ids: set[int] = set()
    for index, raw in enumerate(split.images):
        if not isinstance(raw, dict):
            problems.error(rel_file, f"image #{index} must be an object")
            continue
        image_id = raw.get("id")
        if not _is_int(image_id):
            problems.error(rel_file, f"image #{index} has a non-integer id {image_id!r}")
            continue
        if image_id in seen_image_ids:
            problems.error(rel_file, f"image id {image_id} appears twice")
            continue
        seen_image_ids.add(image_id)
        file_name = raw.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems.error(rel_file, f"image id {image_id} has no file_name")
            continue
        if _unsafe_relative(file_name):
            problems.error(
                rel_file, f"image id {image_id} has file_name {file_name!r}, which leaves the images folder"
            )
            continue
        clean_name = str(PurePosixPath(file_name))
        shown = f"{split.images_rel}/{clean_name}" if split.images_rel not in ("", ".") else clean_name
        path = split.images_dir / clean_name
        real = Path(os.path.realpath(path))
        if not _is_within(real, root):
            problems.error(shown, f"image id {image_id} in {rel_file} links outside the dataset")
            continue
        if not real.is_file():
            problems.error(shown, f"image file listed in {rel_file} (image id {image_id}) does not exist")
            continue
        info = _read_image_header(real)
        if isinstance(info, str):
            problems.error(shown, f"{info} (image id {image_id} in {rel_file})")
            continue
        if info.exif_rotated:
            problems.warn("exif_rotated", shown)
        json_size = (raw.get("width"), raw.get("height"))
        if json_size != (None, None) and json_size != (info.width, info.height):
            problems.warn("size_mismatch", f"{shown} is {info.width}x{info.height}")
        sizes[image_id] = (info.width, info.height)
        image_names[image_id] = shown
        image_paths.add(real)
        images_out.append(
            {"id": image_id, "file_name": clean_name, "width": info.width, "height": info.height}
        )

    valid_category_ids = sorted(c.id for c in split.categories)
    annotations_out: list[dict[str, Any]] = []
    boxes_per_image: Counter[int] = Counter()
    boxes_per_class: Counter[int] = Counter()
    crowd = 0
    for index, raw in enumerate(split.annotations):
        if not isinstance(raw, dict):
            problems.error(rel_file, f"annotation #{index} must be an object")
            continue
        ann_id = raw.get("id")
        where = f"annotation id {ann_id}" if _is_int(ann_id) else f"annotation #{index}"
        image_id, category_id, bbox = raw.get("image_id"), raw.get("category_id"), raw.get("bbox")
        if category_id in skip_category_ids:
            continue  # its category is already reported as an error
        if not _is_int(category_id) or category_id not in category_to_class:
            known = ", ".join(str(i) for i in valid_category_ids[:20])
            if len(valid_category_ids) > 20:
                known += ", ..."
            problems.error(
                rel_file,
                f"{where} has category_id {category_id!r}, which is not among the categories (ids {known})",
            )
            continue
        if not _is_int(image_id) or image_id not in seen_image_ids:
            problems.error(
                rel_file, f"{where} refers to image_id {image_id!r}, which is not among the images"
            )
            continue
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            problems.error(
                rel_file, f"{where} has a malformed bbox {bbox!r} (expected [x, y, width, height])"
            )
            continue
        iscrowd = raw.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # True/False compare equal to 1/0, which is fine
            problems.error(rel_file, f"{where} has iscrowd {iscrowd!r} (expected 0 or 1)")
            continue
        if image_id not in sizes:
            continue  # the image itself is broken; that error is already recorded
        width, height = sizes[image_id]
        x1, y1, w, h = (float(v) for v in bbox)
        x2, y2 = x1 + w, y1 + h
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 <= cx1 or cy2 <= cy1:
            problems.warn("degenerate", f"{rel_file} {where}")
            continue
        if max(abs(cx1 - x1), abs(cy1 - y1), abs(cx2 - x2), abs(cy2 - y2)) > CLIP_TOLERANCE:
            problems.warn("clipped", f"{rel_file} {where}")
        label = category_to_class[category_id]
        box_w, box_h = cx2 - cx1, cy2 - cy1
        annotations_out.append(
            {
                "id": len(annotations_out) + 1,
                "image_id": image_id,
                "category_id": label,
                "bbox": [cx1, cy1, box_w, box_h],
                "area": box_w * box_h,
                "iscrowd": int(iscrowd),
            }
        )
        boxes_per_image[image_id] += 1
        boxes_per_class[label] += 1
        crowd += int(iscrowd)

    for image in images_out:
        if not boxes_per_image[image["id"]]:
            problems.warn("empty_image", image_names[image["id"]])

    stats = SplitStats(
        images=len(images_out),
        images_without_boxes=sum(1 for image in images_out if not boxes_per_image[image["id"]]),
        boxes=len(annotations_out),
        crowd_boxes=crowd,
        boxes_per_class={name: boxes_per_class[i] for i, name in enumerate(class_names)},
        classes_without_boxes=[name for i, name in enumerate(class_names) if not boxes_per_class[i]],
    )
    coco = {
        "info": {"description": f"sanitized {split.name} split of {rel_file}"},
        "images": images_out,
        "annotations": annotations_out,
        "categories": [
            {"id": i, "name": name, "supercategory": "none"} for i, name in enumerate(class_names)
        ],
    }
    return _SplitResult(coco=coco, stats=stats, image_paths=image_paths)


def _write_json_atomic(path: Path, document: dict[str, Any]) -> None:
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


def prepare_coco_dataset(root: Path, train: SplitRef, val: SplitRef, out_dir: Path) -> PreparedDataset:
    """Validate both splits and write sanitized annotation files `out_dir/train.json`, `out_dir/val.json`.

    Classes are the train file's categories sorted by id, minus Roboflow's placeholder category;
    validation categories map onto them by name. Raises `DatasetError` with every problem found
    (up to `MAX_ERRORS`), each detail naming its file; nothing is written in that case.
    Recoverable oddities (clipped or degenerate boxes, images without boxes, size mismatches) become
    aggregated warnings. `SplitFiles.images_dir` is absolute; sanitized `file_name`s are relative to it.
    """
    root = root.resolve()
    problems = _Problems()
    if not root.is_dir():
        raise DatasetError(
            "The dataset folder does not exist",
            details=[{"file": ".", "problem": "dataset folder does not exist", "severity": "error"}],
        )
    loaded_train = _load_split(root, "train", train, problems)
    loaded_val = _load_split(root, "val", val, problems)

    counts: Counter[str] = Counter()
    for loaded in (loaded_train, loaded_val):
        if loaded is not None:
            counts.update(_annotated_names(loaded))

    class_names: tuple[str, ...] = ()
    train_map: dict[int, int] = {}
    val_map: dict[int, int] = {}
    val_unknown: set[int] = set()
    if loaded_train is not None:
        placeholder = _placeholder(loaded_train.categories, counts)
        classes = [c for c in loaded_train.categories if c is not placeholder]
        class_names = tuple(c.name for c in classes)
        train_map = {c.id: i for i, c in enumerate(classes)}
        if not class_names:
            problems.error(loaded_train.rel_file, "has no categories, so there are no classes to train")
        if loaded_val is not None and class_names:
            index_by_name = {name: i for i, name in enumerate(class_names)}
            val_counts = _annotated_names(loaded_val)
            for cat in loaded_val.categories:
                if cat.name in index_by_name:
                    val_map[cat.id] = index_by_name[cat.name]
                elif placeholder is not None and cat.name == placeholder.name:
                    continue  # the same placeholder, exported again with the validation split
                elif val_counts[cat.name]:
                    val_unknown.add(cat.id)
                    problems.error(
                        loaded_val.rel_file,
                        f'category "{cat.name}" (id {cat.id}) is not a class of the training split '
                        f"({loaded_train.rel_file}); known classes: {', '.join(class_names)}",
                    )
                else:
                    # Harmless (no boxes use it) and common when splits were exported separately.
                    problems.warn("unknown_empty_category", f'"{cat.name}" in {loaded_val.rel_file}')
    if loaded_val is not None and not class_names:
        # No usable training classes: still check the validation split on its own, so its problems
        # are reported now, without calling every one of its boxes "unknown category".
        val_map = {c.id: 0 for c in loaded_val.categories}

    results: dict[str, _SplitResult] = {}
    for loaded, mapping, skip in ((loaded_train, train_map, set()), (loaded_val, val_map, val_unknown)):
        if loaded is None:
            continue
        results[loaded.name] = _process_split(loaded, root, class_names, mapping, problems, frozenset(skip))

    train_result = results.get("train")
    if train_result is not None and loaded_train is not None and class_names:
        if train_result.stats.boxes == 0 and train_result.stats.images:
            problems.error(loaded_train.rel_file, "the training split has no usable boxes")
        for name in train_result.stats.classes_without_boxes:
            problems.warn("class_without_boxes", f'"{name}"')
        val_result = results.get("val")
        if val_result is not None:
            # Validation on training images overstates mAP; worth knowing, not worth refusing.
            for shared in sorted(val_result.image_paths & train_result.image_paths):
                problems.warn("shared_images", shared.relative_to(root).as_posix())

    problems.raise_if_errors(class_names, {name: r.stats for name, r in results.items()})
    assert loaded_train is not None and loaded_val is not None
    train_result, val_result = results["train"], results["val"]

    out_dir = out_dir.resolve()
    train_file, val_file = out_dir / "train.json", out_dir / "val.json"
    _write_json_atomic(train_file, train_result.coco)
    _write_json_atomic(val_file, val_result.coco)
    return PreparedDataset(
        class_names=class_names,
        train=SplitFiles(
            images_dir=loaded_train.images_dir,
            annotation_file=train_file,
            num_images=train_result.stats.images,
        ),
        val=SplitFiles(
            images_dir=loaded_val.images_dir, annotation_file=val_file, num_images=val_result.stats.images
        ),
        warnings=problems.warning_messages(),
        stats={"train": train_result.stats, "val": val_result.stats},
    )
