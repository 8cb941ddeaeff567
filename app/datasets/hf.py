"""Hugging Face `datasets` detection datasets, as the seed's `SuperGradientsDetectionDataset` reads them.

A dataset directory that `datasets.load_dataset(path, split=...)` reads (parquet or arrow files, a
`save_to_disk` folder, or an image folder with `metadata.jsonl`), whose samples have `image_id`,
`image`, `width`, `height` and `objects` with `bbox` (pixels, in the spec's `bbox_format`) and
`category` (a `ClassLabel`: its names are the class names; plain strings work too, sorted).

Images are not written out per job (the seed wrote every image to a temporary folder on every run):
each split is decoded once per dataset into `<cache>/hf-<fingerprint>/<split>/`, with the original
encoded bytes (no re-encoding), next to a `manifest.json` of the annotations. The fingerprint covers
every file of the dataset (name, size, mtime), so a changed dataset is cached again; a later job or
validation reads the manifest and never imports `datasets` at all.

`datasets` is imported lazily, here only: the API must start without it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from app.datasets.pipeline import (
    Box,
    ImageFault,
    ImageRecord,
    PreparedDataset,
    annotation_too_large,
    build_split,
    declared_size,
    finish,
    is_int,
    is_number,
    read_image_header,
    write_json_atomic,
)
from app.datasets.problems import Problems, dataset_error
from app.datasets.safe_yaml import UnsafeYaml, load_yaml, load_yaml_file
from app.paths import DATASET_CACHE_FOLDER, is_inside, real, resolve_inside

BBOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh")
DEFAULT_BBOX_FORMAT = "xywh"
VAL_SPLIT_NAMES: tuple[str, ...] = ("validation", "valid", "val", "test")
MANIFEST = "manifest.json"
# 2: rows carry the error's code and the image's sha256.
MANIFEST_VERSION = 2
DATA_SUFFIXES = frozenset({".parquet", ".arrow"})
METADATA_FILES = frozenset({"metadata.jsonl", "metadata.csv", "metadata.parquet"})
# Files `datasets` parses whole as text (metadata, save_to_disk's JSON, JSON or CSV data files).
PARSED_WHOLE_SUFFIXES = frozenset({".json", ".jsonl", ".csv"})
# The dataset card and its standalone YAML, as `datasets` names them; the card is read whole.
CARD = "README.md"
CARD_YAML = ".huggingface.yaml"
MAX_CARD_BYTES = 16 * 2**20
# A scheme (`http://`, `hf://`, `s3://`, `file://`, ...): fsspec would fetch it.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


def _visible_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        files.extend(Path(dirpath) / n for n in sorted(names) if not n.startswith("."))
    return files


def looks_like_hf(root: Path) -> bool:
    """Cheap check (no `datasets` import): parquet or arrow files, save_to_disk output or metadata.jsonl."""
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return True
    return any(p.suffix in DATA_SUFFIXES or p.name in METADATA_FILES for p in _visible_files(root))


def fingerprint(root: Path) -> str:
    """Changes whenever a file of the dataset is added, removed or rewritten (hidden files excluded)."""
    digest = hashlib.sha256()
    for path in _visible_files(root):
        try:
            info = path.stat()
        except OSError:
            continue
        digest.update(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def default_cache_root(root: Path, fallback: Path) -> Path:
    """`<root>/.sgjobs-cache` when the dataset folder is writable, else a folder under `fallback`."""
    preferred = root / DATASET_CACHE_FOLDER
    try:
        preferred.mkdir(exist_ok=True)
        probe = preferred / f".probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
        return preferred
    except OSError:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return fallback / key


def _import_datasets() -> Any:
    # A dataset is a local folder: nothing is ever looked up on the Hub or fetched from a URL, whatever
    # the environment says. Forced, not defaulted, and set on the modules too: both libraries read the
    # variables once, when first imported (possibly before this).
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def _card_yaml(root: Path, name: str, problems: Problems) -> Any:
    """The YAML that `datasets` reads from README.md's front matter or `.huggingface.yaml` (with the
    one safe loader), None when there is none or it is refused (the problem recorded)."""
    path = root / name
    if not path.is_file():
        return None
    if not is_inside(path, root):
        problems.error(name, "links outside the dataset", "outside_dataset")
        return None
    try:
        if name == CARD_YAML:
            return load_yaml_file(path)
        if path.stat().st_size > MAX_CARD_BYTES:
            text = f"is larger than {MAX_CARD_BYTES} bytes (MAX_CARD_BYTES); shorten the dataset card"
            problems.error(name, text, "file_too_large")
            return None
        text = path.read_text(encoding="utf-8")
        from huggingface_hub.repocard import REGEX_YAML_BLOCK  # what `datasets` takes as the front matter

        match = REGEX_YAML_BLOCK.search(text)
        return load_yaml(match.group(2)) if match else None
    except UnsafeYaml as exc:
        problems.error(name, exc.text, exc.code)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.error(name, f"cannot be read as a dataset card: {first}", "unreadable_file")
    return None


def _data_file_patterns(config: dict[str, Any]) -> list[str]:
    """Every path or pattern a `configs` entry names (`data_files` in any of its shapes, `data_dir`)."""
    found: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):  # {split: patterns} or a list's {split, path} items
            for key, item in value.items():
                if key != "split":
                    collect(item)

    collect(config.get("data_files"))
    data_dir = config.get("data_dir")
    if isinstance(data_dir, str):
        found = [data_dir, *(f"{data_dir}/{p}" for p in found)]
    return found


def check_hf_files(root: Path, annotation_max_bytes: int) -> None:
    """What must hold before `datasets` reads the folder: its card's YAML is safe to load, the data
    files it names are inside the dataset (no URL: nothing is fetched), and no metadata or JSON file
    is over `annotation_max_bytes`. Raises `DatasetError` listing every problem."""
    problems = Problems()
    for name in (CARD, CARD_YAML):
        card = _card_yaml(root, name, problems)
        configs = card.get("configs") if isinstance(card, dict) else None
        for config in configs if isinstance(configs, list) else []:
            if not isinstance(config, dict):
                continue
            for pattern in _data_file_patterns(config):
                if _URL.match(pattern) or "::" in pattern:
                    text = f"data_files names {pattern!r}, a URL; name files inside the dataset folder"
                    problems.error(name, text, "remote_data_files")
                elif resolve_inside(root, pattern) is None:
                    text = f"data_files names {pattern!r}, which is not inside the dataset folder"
                    problems.error(name, text, "outside_dataset")
    for path in _visible_files(root):
        if path.suffix.lower() in PARSED_WHOLE_SUFFIXES:
            too_large = annotation_too_large(path, annotation_max_bytes)
            if too_large is not None:
                problems.error(path.relative_to(root).as_posix(), too_large, "file_too_large")
    problems.raise_if_errors()


def available_splits(root: Path, cache_root: Path, arrow_cache: Path) -> list[str]:
    """The split names `load_dataset(root)` would offer (file names only; remembered per dataset version)."""
    remembered = cache_root / f"hf-{fingerprint(root)}" / "splits.json"
    try:
        names = json.loads(remembered.read_text()).get("splits")
        if isinstance(names, list):
            return [str(n) for n in names]
    except (OSError, json.JSONDecodeError):
        pass
    datasets = _import_datasets()
    try:
        builder = datasets.load_dataset_builder(str(root), cache_dir=str(arrow_cache))
    except Exception as exc:  # datasets raises many types for folders it cannot read
        text = f"not readable with datasets.load_dataset: {type(exc).__name__}: {exc}"
        raise dataset_error(".", text, "unreadable_file") from exc
    found = [str(name) for name in (builder.config.data_files or {})]
    write_json_atomic(remembered, {"splits": found})
    return found


def resolve_splits(available: list[str], train: str | None, val: str | None) -> tuple[str, str]:
    """The HF split names for training and validation; defaults `train` and the first of
    validation/valid/val/test. Raises `DatasetError` naming the splits there are."""
    shown = ", ".join(available) or "none"
    train_name = train or "train"
    if train_name not in available:
        text = f"no split {train_name!r} (the dataset has: {shown}); set dataset.splits.train"
        raise dataset_error(".", text, "no_split")
    if val is None:
        val = next((n for n in VAL_SPLIT_NAMES if n in available), None)
        if val is None:
            raise dataset_error(
                ".",
                f"no validation split (looked for {', '.join(VAL_SPLIT_NAMES)}; the dataset has: {shown}); "
                "set dataset.splits.val",
                "no_split",
            )
    elif val not in available:
        text = f"no split {val!r} (the dataset has: {shown}); set dataset.splits.val"
        raise dataset_error(".", text, "no_split")
    return train_name, val


def _safe_split_dir(split: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in split).strip(".") or "split"
    return f"{cleaned}-{hashlib.sha256(split.encode()).hexdigest()[:6]}"


def _category_feature(objects: Any) -> Any:
    """The `category` feature, for `objects` as a dict of lists or a legacy `Sequence` of a dict."""
    fields = objects if isinstance(objects, dict) else getattr(objects, "feature", None)
    category = fields.get("category") if isinstance(fields, dict) else None
    # `List(ClassLabel)` wraps it once more; a bare ClassLabel has no `feature`.
    return getattr(category, "feature", category)


def _extract_split(root: Path, split: str, target: Path, arrow_cache: Path) -> dict[str, Any]:
    """Load one split with `datasets`, write its images (original bytes) and manifest into `target`."""
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(str(root), split=split, cache_dir=str(arrow_cache))
    except Exception as exc:  # a parquet or arrow file that does not parse, among others
        text = f"split {split!r} cannot be loaded: {type(exc).__name__}: {exc}"
        raise dataset_error(".", text, "unreadable_file") from exc
    features = ds.features
    problems: list[str] = []
    for column in ("image", "objects"):
        if column not in features:
            problems.append(f"has no {column!r} column (columns: {', '.join(features)})")
    class_names: list[str] | None = None
    if "objects" in features:
        objects = features["objects"]
        names = objects if isinstance(objects, dict) else getattr(objects, "feature", {})
        if not isinstance(names, dict) or "bbox" not in names or "category" not in names:
            problems.append("objects must have bbox and category")
        else:
            category = _category_feature(objects)
            if isinstance(category, datasets.ClassLabel):
                class_names = [str(n) for n in category.names]
    if "image" in features and not isinstance(features["image"], datasets.Image):
        problems.append("the image column is not an Image feature")
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "split": split,
        "class_names": class_names,
        "feature_errors": problems,
        "rows": [],
    }
    if not problems:
        ds = ds.cast_column("image", datasets.Image(decode=False))
        columns = [c for c in ("image_id", "image", "width", "height", "objects") if c in features]
        for index, row in enumerate(ds.select_columns(columns)):
            manifest["rows"].append(_extract_row(root, index, row, target))
    write_json_atomic(target / MANIFEST, manifest)
    return manifest


def _extract_row(root: Path, index: int, row: dict[str, Any], target: Path) -> dict[str, Any]:
    """One sample as a manifest row; its image (if usable) written into `target` as it was encoded."""
    objects = row.get("objects") or {}
    if isinstance(objects, list):  # a list of {bbox, category} dicts
        objects = {
            "bbox": [o.get("bbox") for o in objects if isinstance(o, dict)],
            "category": [o.get("category") for o in objects if isinstance(o, dict)],
        }
    entry: dict[str, Any] = {
        "row": index,
        "image_id": row.get("image_id"),
        "width": row.get("width"),
        "height": row.get("height"),
        "bbox": objects.get("bbox") or [],
        "category": objects.get("category") or [],
        "file": None,
        "sha256": None,
        "error": None,
        "error_code": None,
    }
    image = row.get("image")
    data: bytes | None = image.get("bytes") if isinstance(image, dict) else None
    source: Path | None = None
    if data is None and isinstance(image, dict) and image.get("path"):
        source = Path(image["path"])
        if not source.is_absolute():
            source = root / source
        if not is_inside(source, root) or not source.is_file():
            entry["error"] = f"image file {image['path']!r} does not exist in the dataset"
            entry["error_code"] = "missing_image"
            return entry
        source = real(source)
        data = source.read_bytes()
    elif data is None:
        entry["error"], entry["error_code"] = "the sample has no image", "missing_image"
        return entry
    info = read_image_header(io.BytesIO(data))
    if isinstance(info, ImageFault):
        entry["error"], entry["error_code"] = info.text, info.code
        return entry
    name = f"{index:07d}{_EXTENSIONS[info.format]}"
    if source is not None:
        try:
            os.link(source, target / name)  # an image folder: no second copy when on one filesystem
        except OSError:
            shutil.copyfile(source, target / name)
    else:
        (target / name).write_bytes(data)
    entry["file"] = name
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    return entry


def _usable(manifest: Any) -> bool:
    """A manifest of this version whose image files are plain names in its folder (the cache is the
    service's own, but a file read from disk is checked before a path is built from it)."""
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return False
    for row in manifest.get("rows", []):
        name = row.get("file")
        if name is not None and (
            not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".")
        ):
            return False
    return True


def split_cache(root: Path, split: str, cache_root: Path, arrow_cache: Path) -> tuple[Path, dict[str, Any]]:
    """The cached split (images folder and manifest), decoding it now if this dataset version has none."""
    root = root.resolve()
    version = f"hf-{fingerprint(root)}"
    final = cache_root / version / _safe_split_dir(split)
    manifest_file = final / MANIFEST
    if manifest_file.is_file():
        try:
            manifest: dict[str, Any] = json.loads(manifest_file.read_text())
            if _usable(manifest):
                return final, manifest
        except (OSError, json.JSONDecodeError, TypeError, AttributeError):
            pass  # a damaged cache is rebuilt below
    staging = cache_root / version / f".{_safe_split_dir(split)}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        manifest = _extract_split(root, split, staging, arrow_cache)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # another process won the race with a full copy: use it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Older versions of this dataset are of no use any more.
    for stale in cache_root.glob("hf-*"):
        if stale.name != version:
            shutil.rmtree(stale, ignore_errors=True)
    return final, manifest


def _to_xyxy(bbox: list[float], bbox_format: str) -> tuple[float, float, float, float]:
    a, b, c, d = bbox
    if bbox_format == "xyxy":
        return a, b, c, d
    if bbox_format == "xywh":
        return a, b, a + c, b + d
    return a - c / 2, b - d / 2, a + c / 2, b + d / 2


def _records(
    split: str,
    manifest: dict[str, Any],
    images_dir: Path,
    class_names: tuple[str, ...],
    by_name: bool,
    bbox_format: str,
    problems: Problems,
) -> list[ImageRecord]:
    """The split's samples as images with pixel boxes; each problem named by split, row and image_id."""
    records: list[ImageRecord] = []
    seen: dict[Any, int] = {}
    index_of = {n: i for i, n in enumerate(class_names)}
    for row in manifest["rows"]:
        image_id = row["image_id"]
        shown = f"{split} split row {row['row']}" + (
            f" (image_id {image_id})" if image_id is not None else ""
        )
        if row["error"]:
            problems.error(shown, row["error"], row["error_code"])
            continue
        if image_id is not None:
            key = json.dumps(image_id)
            if key in seen:
                text = f"image_id {image_id} appears twice (also row {seen[key]})"
                problems.error(shown, text, "duplicate_image")
                continue
            seen[key] = row["row"]
        record = ImageRecord(
            image_id=row["row"],
            file_name=row["file"],
            path=images_dir / row["file"],
            shown=shown,
            declared_size=declared_size(row["width"], row["height"]),
            # The cached file is a copy: the same image in two splits has two files, one content.
            identity=f"sha256:{row['sha256']}",
        )
        bboxes, categories = row["bbox"], row["category"]
        if len(bboxes) != len(categories):
            text = f"objects has {len(bboxes)} boxes but {len(categories)} categories"
            problems.error(shown, text, "malformed_annotation")
            continue
        for number, (bbox, category) in enumerate(zip(bboxes, categories, strict=True)):
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
                text = f"box {number} is malformed: {bbox!r} (expected 4 numbers)"
                problems.error(shown, text, "malformed_annotation")
                continue
            label: int | None
            if by_name:
                label = index_of.get(category) if isinstance(category, str) else None
            else:
                label = category if is_int(category) and 0 <= category < len(class_names) else None
            if label is None:
                problems.error(
                    shown,
                    f"box {number} has category {category!r}, which is not a class "
                    f"({len(class_names)} classes: {', '.join(class_names[:20])})",
                    "unknown_class",
                )
                continue
            xyxy = _to_xyxy([float(v) for v in bbox], bbox_format)
            record.boxes.append(Box(label, *xyxy, f"box {number}"))
        records.append(record)
    return records


def prepare_hf_dataset(
    root: Path,
    *,
    bbox_format: str,
    train_split: str | None,
    val_split: str | None,
    out_dir: Path,
    cache_root: Path,
    annotation_max_bytes: int,
) -> PreparedDataset:
    """Validate an HF detection dataset and write sanitized COCO files `out_dir/{train,val}.json`.

    Images come from the per-dataset cache (decoded once). Raises `DatasetError` listing every problem:
    an unsafe card, data files outside the dataset or files too large (`check_hf_files`), unreadable
    splits, missing columns, missing or unreadable images, duplicate image ids, malformed boxes,
    categories that are not classes; boxes outside their image are clipped and boxes without
    area dropped (warnings), as for every format (`app.datasets.pipeline`).
    """
    if bbox_format not in BBOX_FORMATS:
        text = f"bbox_format must be one of {', '.join(BBOX_FORMATS)}"
        raise dataset_error(".", text, "bad_option")
    root = root.resolve()
    check_hf_files(root, annotation_max_bytes)
    cache_root.mkdir(parents=True, exist_ok=True)
    # `datasets` converts the files to arrow once more in its own cache: only needed while the images
    # are decoded, so it lives in a scratch folder and the dataset is not stored three times.
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".arrow-") as arrow:
        available = available_splits(root, cache_root, Path(arrow))
        train_name, val_name = resolve_splits(available, train_split, val_split)
        cached = {
            name: split_cache(root, hf, cache_root, Path(arrow))
            for name, hf in (("train", train_name), ("val", val_name))
        }
    problems = Problems()
    for _, manifest in cached.values():
        for problem in manifest["feature_errors"]:
            problems.error(f"{manifest['split']} split", problem, "bad_schema")
    train_manifest = cached["train"][1]
    by_name = train_manifest["class_names"] is None
    if by_name:
        # Plain strings as categories (an image folder's metadata): the class names are those used, sorted.
        names = {c for row in train_manifest["rows"] for c in row["category"] if isinstance(c, str)}
        class_names = tuple(sorted(names))
    else:
        class_names = tuple(train_manifest["class_names"])
        val_names = cached["val"][1]["class_names"]
        if val_names is not None and tuple(val_names) != class_names:
            problems.error(
                f"{val_name} split",
                f"its category names {val_names} differ from the training split's {list(class_names)}",
                "bad_class_list",
            )
    results = {}
    for name, hf in (("train", train_name), ("val", val_name)):
        images_dir, manifest = cached[name]
        if manifest["feature_errors"]:
            continue
        records = _records(hf, manifest, images_dir, class_names, by_name, bbox_format, problems)
        hint = f"check bbox_format: the boxes were read as {bbox_format} in pixels"
        results[name] = build_split(
            name, f"{hf} split", records, images_dir, class_names, problems, inside=images_dir, box_hint=hint
        )
    return finish(
        class_names, results.get("train"), results.get("val"), problems, out_dir, f"{train_name} split"
    )
