"""YOLO datasets in the Ultralytics layout: `data.yaml`, `images/` and `labels/` per split.

`data.yaml` names the classes (`names`: a list, or a mapping 0..n-1) and the splits (`train`, `val`,
each a folder, a `.txt` list of images or a list of those), relative to `path` or the YAML's folder.
Each image `.../images/.../x.jpg` has its labels in `.../labels/.../x.txt`, one `class cx cy w h`
line per box, normalised to 0..1 (polygon lines `class x1 y1 x2 y2 ...` become their bounding box).
An image without a label file has no boxes (a background image).

Roboflow's YOLO export writes `train: ../train/images` next to `train/images`: the `../` is dropped
when the path as written does not exist, as Ultralytics' own loaders do.

Images stay where they are: the sanitized COCO files name them relative to the dataset root.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from app.datasets.pipeline import (
    Box,
    ImageRecord,
    PreparedDataset,
    annotation_too_large,
    build_split,
    finish,
    read_image,
    single_subfolder,
)
from app.datasets.problems import Problems, dataset_error, problem
from app.datasets.safe_yaml import UnsafeYaml, load_yaml_file
from app.errors import DatasetError
from app.paths import is_inside, unsafe_relative

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo"})
DEFAULT_YAML_NAMES: tuple[str, ...] = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
MAX_LABEL_BYTES = 16 * 2**20
BOX_HINT = "YOLO labels are class cx cy w h, normalised to 0..1"


@dataclass(frozen=True)
class YoloLayout:
    """What `data.yaml` says: class names and, per split, the image sources (paths under the root)."""

    yaml_rel: str
    class_names: tuple[str, ...]
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    val_key: str


def find_data_yaml(root: Path, data_yaml: str | None) -> str:
    """The data YAML relative to `root`: the one named, else `data.yaml` (or the only `*.yaml`), also
    one folder down when the dataset is wrapped in a single folder. Raises `DatasetError`."""
    if data_yaml is not None:
        if unsafe_relative(data_yaml):
            raise dataset_error(data_yaml, "data_yaml must be a path inside the dataset", "outside_dataset")
        if not (root / data_yaml).is_file():
            raise dataset_error(data_yaml, "data_yaml does not exist in the dataset", "missing_file")
        return str(PurePosixPath(data_yaml))
    for base in (root, single_subfolder(root)):
        if base is None:
            continue
        prefix = "" if base == root else f"{base.name}/"
        for name in DEFAULT_YAML_NAMES:
            if (base / name).is_file():
                return prefix + name
        candidates = sorted(p.name for p in base.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if len(candidates) == 1:
            return prefix + candidates[0]
        if len(candidates) > 1:
            raise dataset_error(
                prefix or ".",
                f"several YAML files ({', '.join(candidates)}); name the one to use in dataset.data_yaml",
                "ambiguous_layout",
            )
    looked = ", ".join(DEFAULT_YAML_NAMES)
    raise dataset_error(".", f"no data.yaml found (looked for {looked})", "missing_file")


def _resolve_source(root: Path, base: Path, entry: str) -> Path | None:
    """A split entry of data.yaml as a path under the root (None if it is not there)."""
    clean = entry.replace("\\", "/").strip()
    candidates = [clean]
    stripped = clean
    while stripped.startswith("../"):  # Roboflow's export: `../train/images` next to train/
        stripped = stripped[3:]
        candidates.append(stripped)
    if clean.startswith("./"):
        candidates.append(clean[2:])
    for candidate in candidates:
        if not candidate or PurePosixPath(candidate).is_absolute():
            continue
        path = Path(os.path.normpath(base / candidate))
        if is_inside(path, root) and path.exists():
            return path
    return None


def load_layout(root: Path, data_yaml: str | None) -> YoloLayout:
    """Read and check `data.yaml` (cheap: no image is opened). Raises `DatasetError` naming the file."""
    root = root.resolve()
    rel = find_data_yaml(root, data_yaml)
    path = root / rel
    if not is_inside(path, root):
        raise dataset_error(rel, "links outside the dataset", "outside_dataset")
    try:
        data = load_yaml_file(path)
    except UnsafeYaml as exc:
        raise dataset_error(rel, exc.text, exc.code) from exc
    except OSError as exc:
        raise dataset_error(rel, f"cannot be read: {exc.strerror or exc}", "unreadable_file") from exc
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc
        raise dataset_error(rel, f"is not valid YAML: {first}", "unreadable_file") from exc
    if not isinstance(data, dict):
        raise dataset_error(rel, "must be a YAML mapping with names, train and val", "bad_schema")
    names = _class_names(rel, data)
    base = path.parent
    declared = data.get("path")
    if isinstance(declared, str) and declared and not PurePosixPath(declared).is_absolute():
        candidate = Path(os.path.normpath(base / declared))
        # An absolute `path` is the author's machine; a relative one is honoured when it stays inside.
        if is_inside(candidate, root) and candidate.is_dir():
            base = candidate
    problems: list[dict[str, str]] = []
    train = _sources(root, base, rel, "train", data.get("train"), problems)
    val_key = next((k for k in ("val", "valid", "test") if data.get(k)), "val")
    val = _sources(root, base, rel, val_key, data.get(val_key), problems)
    if problems:
        raise DatasetError("; ".join(f"{p['file']}: {p['problem']}" for p in problems), details=problems)
    return YoloLayout(yaml_rel=rel, class_names=names, train=train, val=val, val_key=val_key)


def _class_names(rel: str, data: dict[str, Any]) -> tuple[str, ...]:
    raw = data.get("names")
    names: list[str]
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError) as exc:
            raise dataset_error(rel, "names must map class ids 0, 1, ... to names", "bad_class_list") from exc
        if keys != list(range(len(keys))):
            text = f"names must map the class ids 0..{len(keys) - 1} without gaps, got {keys}"
            raise dataset_error(rel, text, "bad_class_list")
        by_id = {int(k): v for k, v in raw.items()}
        names = [str(by_id[k]) for k in keys]
    else:
        raise dataset_error(rel, "has no names list (the class names)", "no_classes")
    if not names:
        raise dataset_error(rel, "names is empty, so there are no classes to train", "no_classes")
    if any(not n.strip() for n in names):
        raise dataset_error(rel, "a class name is empty", "bad_class_list")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise dataset_error(rel, f"class names appear twice: {', '.join(duplicates)}", "bad_class_list")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise dataset_error(rel, f"nc is {nc} but names lists {len(names)} classes", "bad_class_list")
    return tuple(names)


def _sources(
    root: Path, base: Path, rel: str, key: str, value: object, problems: list[dict[str, str]]
) -> tuple[Path, ...]:
    entries = value if isinstance(value, list) else [value] if value else []
    if not entries:
        problems.append(problem(rel, f"has no {key} split", "no_split"))
        return ()
    found: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            problems.append(problem(rel, f"{key} entry {entry!r} is not a path", "bad_schema"))
            continue
        path = _resolve_source(root, base, entry)
        if path is None:
            text = f"{key} split {entry!r} is not a folder or file inside the dataset"
            problems.append(problem(rel, text, "no_split"))
            continue
        found.append(path)
    return tuple(found)


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` becomes `/labels/`, the suffix `.txt`."""
    text = image.as_posix()
    if "/images/" in text:
        head, tail = text.rsplit("/images/", 1)
        text = f"{head}/labels/{tail}"
    return Path(text).with_suffix(".txt")


def _list_images(root: Path, source: Path, problems: Problems, annotation_max_bytes: int) -> list[Path]:
    if source.is_dir():
        found = []
        for dirpath, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    found.append(Path(dirpath) / name)
        return found
    rel = source.relative_to(root).as_posix()
    too_large = annotation_too_large(source, annotation_max_bytes)
    if too_large is not None:
        problems.error(rel, too_large, "file_too_large")
        return []
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.error(rel, f"image list cannot be read: {exc}", "unreadable_file")
        return []
    images = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry:
            continue
        path = _resolve_source(root, source.parent, entry) or _resolve_source(root, root, entry)
        if path is None:
            text = f"line {number}: image {entry!r} does not exist inside the dataset"
            problems.error(rel, text, "missing_image")
            continue
        images.append(path)
    return images


def _parse_labels(
    label: Path, shown: str, size: tuple[int, int], num_classes: int, problems: Problems
) -> list[Box]:
    """The boxes of one label file in pixels; `shown` names the label file in errors."""
    try:
        if label.stat().st_size > MAX_LABEL_BYTES:
            problems.error(shown, "label file is too large", "unreadable_file")
            return []
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.error(shown, f"label file cannot be read: {exc}", "unreadable_file")
        return []
    width, height = size
    boxes: list[Box] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            text = f"line {number} does not parse: {line.strip()[:80]!r} (expected class cx cy w h)"
            problems.error(shown, text, "malformed_annotation")
            continue
        if not all(math.isfinite(v) for v in values):
            text = f"line {number} has a value that is not a finite number"
            problems.error(shown, text, "malformed_annotation")
            continue
        label_value, coords = values[0], values[1:]
        if len(coords) == 4:
            cx, cy, w, h = coords
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            xs, ys = coords[0::2], coords[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        else:
            text = f"line {number} has {len(parts)} values (expected 5: class cx cy w h, or a polygon)"
            problems.error(shown, text, "malformed_annotation")
            continue
        if label_value != int(label_value) or not 0 <= label_value < num_classes:
            problems.error(
                shown,
                f"line {number} has class id {parts[0]}, which is not a class "
                f"(data.yaml names {num_classes}: 0..{num_classes - 1})",
                "unknown_class",
            )
            continue
        ref = f"label line {number}"
        boxes.append(Box(int(label_value), x1 * width, y1 * height, x2 * width, y2 * height, ref))
    return boxes


def _read_split(
    root: Path, sources: tuple[Path, ...], layout: YoloLayout, problems: Problems, annotation_max_bytes: int
) -> list[ImageRecord]:
    """The split's images, read (labels are normalised: the image size is needed to parse them)."""
    records: list[ImageRecord] = []
    by_label: dict[Path, str] = {}
    used_labels: set[Path] = set()
    for source in sources:
        for image in _list_images(root, source, problems, annotation_max_bytes):
            shown = image.relative_to(root).as_posix() if image.is_relative_to(root) else image.name
            label = label_path(image)
            if label in by_label:
                # Two images share one label file (x.jpg and x.png): they would share an id and boxes.
                text = f"duplicate image: {by_label[label]} has the same name (and label file)"
                problems.error(shown, text, "duplicate_image")
                continue
            by_label[label] = shown
            has_label = label.is_file() and is_inside(label, root)
            if has_label:
                used_labels.add(label)  # the label file has its image, even if that is unreadable
            record = ImageRecord(image_id=len(records), file_name=shown, path=image, shown=shown)
            records.append(record)
            size = read_image(record, problems, root)
            if size is not None and has_label:
                label_shown = label.relative_to(root).as_posix()
                record.boxes = _parse_labels(label, label_shown, size, len(layout.class_names), problems)
    for source in sources:
        labels_dir = label_path(source / "x").parent if source.is_dir() else None
        if labels_dir is None or not labels_dir.is_dir():
            continue
        for label in sorted(labels_dir.rglob("*.txt")):
            if label not in used_labels and label.name != "classes.txt":
                problems.warn("orphan_label", label.relative_to(root).as_posix())
    return records


def prepare_yolo_dataset(
    root: Path, data_yaml: str | None, out_dir: Path, *, annotation_max_bytes: int
) -> PreparedDataset:
    """Validate a YOLO dataset and write sanitized COCO files `out_dir/{train,val}.json`.

    An image list (`.txt`) larger than `annotation_max_bytes` is refused unread.

    Images are referenced where they are (`images_dir` is the dataset root). Raises `DatasetError`
    (an `InvalidDataset` with counts) listing every problem with its file.
    """
    root = root.resolve()
    layout = load_layout(root, data_yaml)
    problems = Problems()
    results = {}
    for name, sources in (("train", layout.train), ("val", layout.val)):
        records = _read_split(root, sources, layout, problems, annotation_max_bytes)
        source = ", ".join(s.relative_to(root).as_posix() for s in sources)
        results[name] = build_split(
            name, source, records, root, layout.class_names, problems, inside=root, box_hint=BOX_HINT
        )
    return finish(
        layout.class_names,
        results["train"],
        results["val"],
        problems,
        out_dir,
        layout.yaml_rel,
    )
