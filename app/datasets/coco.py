"""COCO detection datasets: Roboflow's export layout or COCO's own, checked and sanitized for training.

super-gradients' `COCOFormatDetectionDataset` trusts its input: a missing image fails mid-epoch, an
annotation whose `category_id` is not among the categories silently shifts the labels of later boxes,
and the `width`/`height` in the JSON (not the file's) drive box clipping. So training only ever sees
the sanitized files written by `prepare_coco_dataset`: category ids 0..n-1 in class order, real image
sizes, clipped boxes.

This module does what is specific to COCO: finding the splits, reading and shape-checking the JSON,
mapping categories to classes (Roboflow's placeholder category, validation categories by name) and
turning images and annotations into `ImageRecord`s. The checks every format shares (image files,
box clipping, counts, warnings) are `app.datasets.pipeline`'s.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.datasets.pipeline import (
    Box,
    ImageRecord,
    PreparedDataset,
    annotation_too_large,
    build_split,
    declared_size,
    finish,
    is_int,
    is_number,
    single_subfolder,
)
from app.datasets.problems import Problems, problem
from app.errors import DatasetError
from app.paths import resolve_inside, unsafe_relative

ROBOFLOW_ANNOTATION_FILE = "_annotations.coco.json"
# Roboflow exports the validation split as "valid"; other tools use "val"; a dataset with only a
# test split still has something to validate on.
ROBOFLOW_VAL_FOLDERS: tuple[str, ...] = ("valid", "val", "test")
BOX_HINT = "COCO boxes are [x, y, width, height] in pixels"
# Messages list at most this many category ids.
_SHOWN_IDS = 20


@dataclass(frozen=True)
class SplitRef:
    """Where one split lives, both paths relative to the dataset root."""

    images: str
    annotations: str


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
    _check_ref_inside(train, "train")
    _check_ref_inside(val, "val")
    if train is not None and val is not None:
        return train, val

    base, prefix = root, ""
    if _find_train(root) is None and train is None:
        inner = single_subfolder(root)
        if inner is not None and _find_train(inner) is not None:
            base, prefix = inner, inner.name

    def found(ref: SplitRef | None) -> SplitRef | None:
        return _prefixed(ref, prefix) if ref is not None and prefix else ref

    resolved_train = train or found(_find_train(base))
    resolved_val = val or found(_find_val(base))
    details: list[dict[str, str]] = []
    if resolved_train is None:
        looked = "; ".join(_looked_for_train())
        details.append(problem(".", f"no training split found; looked for {looked}", "no_split"))
    if resolved_val is None:
        looked = "; ".join(_looked_for_val())
        details.append(problem(".", f"no validation split found; looked for {looked}", "no_split"))
    if details:
        raise DatasetError(
            "Could not find the dataset's splits: " + " ".join(d["problem"] + "." for d in details),
            details=details,
        )
    assert resolved_train is not None and resolved_val is not None
    return resolved_train, resolved_val


def _check_ref_inside(ref: SplitRef | None, split: str) -> None:
    if ref is None:
        return
    bad = [p for p in (ref.images, ref.annotations) if unsafe_relative(p)]
    if bad:
        text = f"{split} path must be relative and stay inside the dataset"
        details = [problem(p, text, "outside_dataset") for p in bad]
        raise DatasetError(f"The {split} split points outside the dataset: {', '.join(bad)}", details=details)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


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


def _read_json(
    path: Path, rel_file: str, problems: Problems, annotation_max_bytes: int
) -> dict[str, Any] | None:
    """The annotation file's top-level object with its three lists; None (errors recorded) otherwise."""
    too_large = annotation_too_large(path, annotation_max_bytes)
    if too_large is not None:
        problems.error(rel_file, too_large, "file_too_large")
        return None
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except OSError as exc:
        problems.error(rel_file, f"cannot be read: {exc.strerror or exc}", "unreadable_file")
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.error(rel_file, f"is not valid JSON: {exc}", "unreadable_file")
        return None
    except RecursionError:
        problems.error(rel_file, "is not valid JSON: nested too deeply", "unreadable_file")
        return None
    if not isinstance(data, dict):
        problems.error(rel_file, f"top level must be a JSON object, got {type(data).__name__}", "bad_schema")
        return None
    ok = True
    for key in ("images", "annotations", "categories"):
        if key not in data:
            problems.error(rel_file, f'missing key "{key}"', "bad_schema")
            ok = False
        elif not isinstance(data[key], list):
            problems.error(rel_file, f'"{key}" must be a list, got {type(data[key]).__name__}', "bad_schema")
            ok = False
    return data if ok else None


def _categories(raw_categories: list[Any], rel_file: str, problems: Problems) -> list[_Category]:
    categories: list[_Category] = []
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for index, raw in enumerate(raw_categories):
        where = f"category #{index}"
        if not isinstance(raw, dict):
            problems.error(rel_file, f"{where} must be an object", "bad_class_list")
            continue
        cat_id, cat_name = raw.get("id"), raw.get("name")
        if not is_int(cat_id):
            problems.error(rel_file, f"{where} has a non-integer id {cat_id!r}", "bad_class_list")
            continue
        if not isinstance(cat_name, str) or not cat_name.strip():
            problems.error(rel_file, f"category id {cat_id} has no name", "bad_class_list")
            continue
        if cat_id in seen_ids:
            problems.error(rel_file, f"category id {cat_id} appears twice", "bad_class_list")
            continue
        if cat_name in seen_names:
            problems.error(rel_file, f'category name "{cat_name}" appears twice', "bad_class_list")
            continue
        seen_ids.add(cat_id)
        seen_names.add(cat_name)
        supercategory = raw.get("supercategory")
        categories.append(
            _Category(cat_id, cat_name, supercategory if isinstance(supercategory, str) else None)
        )
    categories.sort(key=lambda c: c.id)
    return categories


def _load_split(
    root: Path, name: str, ref: SplitRef, problems: Problems, annotation_max_bytes: int
) -> _LoadedSplit | None:
    """Read one split's JSON and check its shape; None (with errors recorded) if unusable."""
    rel_file = str(PurePosixPath(ref.annotations))
    unsafe = [rel for rel in (ref.annotations, ref.images) if unsafe_relative(rel)]
    for rel in unsafe:
        text = f"{name} split path must be relative and stay inside the dataset"
        problems.error(rel, text, "outside_dataset")
    if unsafe:
        return None
    annotation_path = resolve_inside(root, ref.annotations)
    images_dir = resolve_inside(root, ref.images)
    if annotation_path is None or images_dir is None:
        problems.error(rel_file, f"{name} split links outside the dataset", "outside_dataset")
        return None
    images_ok = images_dir.is_dir()
    if not images_ok:
        problems.error(ref.images, f"images folder of the {name} split does not exist", "missing_file")
    if not annotation_path.is_file():
        problems.error(rel_file, f"annotation file of the {name} split does not exist", "missing_file")
        return None
    data = _read_json(annotation_path, rel_file, problems, annotation_max_bytes)
    if data is None or not images_ok:
        return None
    return _LoadedSplit(
        name=name,
        rel_file=rel_file,
        images_rel=str(PurePosixPath(ref.images)),
        images_dir=images_dir,
        categories=_categories(data["categories"], rel_file, problems),
        images=data["images"],
        annotations=data["annotations"],
    )


# --------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------


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
class _Classes:
    names: tuple[str, ...]
    train_map: dict[int, int]  # train category id -> class index
    val_map: dict[int, int]  # val category id -> class index
    val_unknown: frozenset[int]  # val category ids with boxes that are not classes (already reported)


def _classes(train: _LoadedSplit | None, val: _LoadedSplit | None, problems: Problems) -> _Classes:
    """Classes are the train file's categories sorted by id, minus Roboflow's placeholder category;
    validation categories map onto them by name."""
    classes = _Classes((), {}, {}, frozenset())
    placeholder = None
    if train is not None:
        counts = _annotated_names(train) + (_annotated_names(val) if val is not None else Counter())
        placeholder = _placeholder(train.categories, counts)
        kept = [c for c in train.categories if c is not placeholder]
        classes.names = tuple(c.name for c in kept)
        classes.train_map = {c.id: i for i, c in enumerate(kept)}
    if val is None:
        return classes
    if train is None or not classes.names:
        # No (usable) training classes: still check the validation split on its own, so its problems
        # are reported now, without calling every one of its boxes "unknown category".
        classes.val_map = {c.id: 0 for c in val.categories}
        return classes
    index_by_name = {name: i for i, name in enumerate(classes.names)}
    val_counts = _annotated_names(val)
    unknown: set[int] = set()
    for cat in val.categories:
        if cat.name in index_by_name:
            classes.val_map[cat.id] = index_by_name[cat.name]
        elif placeholder is not None and cat.name == placeholder.name:
            continue  # the same placeholder, exported again with the validation split
        elif val_counts[cat.name]:
            unknown.add(cat.id)
            problems.error(
                val.rel_file,
                f'category "{cat.name}" (id {cat.id}) is not a class of the training split '
                f"({train.rel_file}); known classes: {', '.join(classes.names)}",
                "unknown_class",
            )
        else:
            # Harmless (no boxes use it) and common when splits were exported separately.
            problems.warn("unknown_empty_category", f'"{cat.name}" in {val.rel_file}')
    classes.val_unknown = frozenset(unknown)
    return classes


# --------------------------------------------------------------------------------------------------
# Images and annotations
# --------------------------------------------------------------------------------------------------


def _image_records(split: _LoadedSplit, problems: Problems) -> tuple[dict[int, ImageRecord], set[int]]:
    """The split's images by id, and every id seen (also those of entries that are unusable)."""
    rel_file = split.rel_file
    records: dict[int, ImageRecord] = {}
    seen: set[int] = set()
    for index, raw in enumerate(split.images):
        if not isinstance(raw, dict):
            problems.error(rel_file, f"image #{index} must be an object", "malformed_annotation")
            continue
        image_id = raw.get("id")
        if not is_int(image_id):
            problems.error(
                rel_file, f"image #{index} has a non-integer id {image_id!r}", "malformed_annotation"
            )
            continue
        if image_id in seen:
            problems.error(rel_file, f"image id {image_id} appears twice", "duplicate_image")
            continue
        seen.add(image_id)
        file_name = raw.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems.error(rel_file, f"image id {image_id} has no file_name", "malformed_annotation")
            continue
        if unsafe_relative(file_name):
            problems.error(
                rel_file,
                f"image id {image_id} has file_name {file_name!r}, which leaves the images folder",
                "outside_dataset",
            )
            continue
        clean_name = str(PurePosixPath(file_name))
        records[image_id] = ImageRecord(
            image_id=image_id,
            file_name=clean_name,
            path=split.images_dir / clean_name,
            shown=f"{split.images_rel}/{clean_name}" if split.images_rel not in ("", ".") else clean_name,
            context=f"image id {image_id} in {rel_file}",
            declared_size=declared_size(raw.get("width"), raw.get("height")),
        )
    return records, seen


def _records(
    split: _LoadedSplit, category_to_class: dict[int, int], skip: frozenset[int], problems: Problems
) -> list[ImageRecord]:
    """Check the split's images and annotations; its images with their boxes (in pixels, XYXY)."""
    rel_file = split.rel_file
    records, seen_image_ids = _image_records(split, problems)
    valid_category_ids = sorted(c.id for c in split.categories)
    known = ", ".join(str(i) for i in valid_category_ids[:_SHOWN_IDS])
    if len(valid_category_ids) > _SHOWN_IDS:
        known += ", ..."
    for index, raw in enumerate(split.annotations):
        if not isinstance(raw, dict):
            problems.error(rel_file, f"annotation #{index} must be an object", "malformed_annotation")
            continue
        ann_id = raw.get("id")
        where = f"annotation id {ann_id}" if is_int(ann_id) else f"annotation #{index}"
        image_id, category_id, bbox = raw.get("image_id"), raw.get("category_id"), raw.get("bbox")
        if category_id in skip:
            continue  # its category is already reported as an error
        if not is_int(category_id) or category_id not in category_to_class:
            problems.error(
                rel_file,
                f"{where} has category_id {category_id!r}, which is not among the categories (ids {known})",
                "unknown_class",
            )
            continue
        if not is_int(image_id) or image_id not in seen_image_ids:
            problems.error(
                rel_file,
                f"{where} refers to image_id {image_id!r}, which is not among the images",
                "malformed_annotation",
            )
            continue
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
            problems.error(
                rel_file,
                f"{where} has a malformed bbox {bbox!r} (expected [x, y, width, height])",
                "malformed_annotation",
            )
            continue
        iscrowd = raw.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # True/False compare equal to 1/0, which is fine
            problems.error(
                rel_file, f"{where} has iscrowd {iscrowd!r} (expected 0 or 1)", "malformed_annotation"
            )
            continue
        record = records.get(image_id)
        if record is None:
            continue  # the image entry itself is unusable; that error is already recorded
        x, y, w, h = (float(v) for v in bbox)
        label = category_to_class[category_id]
        record.boxes.append(Box(label, x, y, x + w, y + h, where, crowd=bool(iscrowd)))
    return list(records.values())


def prepare_coco_dataset(
    root: Path, train: SplitRef, val: SplitRef, out_dir: Path, *, annotation_max_bytes: int
) -> PreparedDataset:
    """Validate both splits and write sanitized annotation files `out_dir/train.json`, `out_dir/val.json`.

    Raises `DatasetError` (an `InvalidDataset` with counts) with every problem found, each naming its
    file; nothing is written in that case. Recoverable oddities (clipped or degenerate boxes, images
    without boxes, size mismatches) become aggregated warnings. `SplitFiles.images_dir` is absolute;
    sanitized `file_name`s are relative to it. Annotation files over `annotation_max_bytes` are not read.
    """
    root = root.resolve()
    if not root.is_dir():
        raise DatasetError(
            "The dataset folder does not exist",
            details=[problem(".", "dataset folder does not exist", "missing_file")],
        )
    problems = Problems()
    loaded_train = _load_split(root, "train", train, problems, annotation_max_bytes)
    loaded_val = _load_split(root, "val", val, problems, annotation_max_bytes)
    classes = _classes(loaded_train, loaded_val, problems)
    results = {}
    for loaded, mapping, skip in (
        (loaded_train, classes.train_map, frozenset[int]()),
        (loaded_val, classes.val_map, classes.val_unknown),
    ):
        if loaded is None:
            continue
        records = _records(loaded, mapping, skip, problems)
        results[loaded.name] = build_split(
            loaded.name,
            loaded.rel_file,
            records,
            loaded.images_dir,
            classes.names,
            problems,
            inside=root,
            box_hint=BOX_HINT,
        )
    train_source = loaded_train.rel_file if loaded_train is not None else train.annotations
    return finish(classes.names, results.get("train"), results.get("val"), problems, out_dir, train_source)
