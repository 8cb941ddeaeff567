"""One entry point for every dataset format: detect it, check its layout, prepare it, report on it.

Every format ends as the same `PreparedDataset` (sanitized COCO files and an images folder), so the
training code, metrics and prediction never know which format a dataset came in.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.datasets import hf, yolo
from app.datasets.coco import ROBOFLOW_ANNOTATION_FILE, SplitRef, prepare_coco_dataset, resolve_coco_splits
from app.datasets.pipeline import PreparedDataset, single_subfolder
from app.datasets.problems import FALLBACK_CODE, InvalidDataset, problem
from app.errors import DatasetError


@dataclass(frozen=True)
class DatasetOptions:
    """The format and its options, as a job spec (or a registered dataset) gives them."""

    format: str
    coco_train: SplitRef | None = None
    coco_val: SplitRef | None = None
    bbox_format: str | None = None
    hf_train: str | None = None
    hf_val: str | None = None
    data_yaml: str | None = None


def detect_format(root: Path) -> tuple[str, Path]:
    """'coco', 'yolo' or 'hf' from the files, and the folder that holds the dataset (`root`, or the
    single folder an archive wrapped it in). Raises `DatasetError` when no format is recognised or
    the layout fits several.
    """
    found: list[str] = []
    for base in (root, single_subfolder(root)):
        if base is None:
            continue
        try:
            resolve_coco_splits(base, None, None)
            found.append("coco")
        except DatasetError:
            if any(base.glob(f"*/{ROBOFLOW_ANNOTATION_FILE}")) or any(base.glob("annotations/*.json")):
                found.append("coco")  # the layout is COCO even if a split is missing: say so later
        try:
            yolo.find_data_yaml(base, None)
            found.append("yolo")
        except DatasetError:
            pass
        if hf.looks_like_hf(base):
            found.append("hf")
        if found:
            break
    unique = sorted(set(found))
    if len(unique) == 1:
        assert base is not None
        return unique[0], base
    if not unique:
        raise DatasetError(
            "The dataset format was not recognised: expected COCO (train/_annotations.coco.json or "
            "annotations/instances_*.json), YOLO (data.yaml with images/ and labels/) or a Hugging Face "
            "dataset (parquet or arrow files, dataset_dict.json, or an image folder with metadata.jsonl)",
            details=[problem(".", "format not recognised", "format_not_recognised")],
        )
    raise DatasetError(
        f"The dataset looks like several formats ({', '.join(unique)}); upload one",
        details=[problem(".", f"ambiguous format: {', '.join(unique)}", "ambiguous_format")],
    )


def hf_root(root: Path) -> Path:
    """HF datasets wrapped in one folder (as zips often are) are read from inside it."""
    inner = single_subfolder(root)
    if inner is not None and inner.name != "data" and hf.looks_like_hf(inner):
        return inner
    return root


def check_layout(root: Path, options: DatasetOptions) -> None:
    """Cheap checks for POST /jobs (file names and small YAML only; no image, no `datasets` import).

    Raises `DatasetError` saying what is missing.
    """
    if options.format == "coco":
        resolve_coco_splits(root, options.coco_train, options.coco_val)
    elif options.format == "yolo":
        yolo.load_layout(root, options.data_yaml)
    elif options.format == "hf":
        if not hf.looks_like_hf(root):
            raise DatasetError(
                "no Hugging Face dataset files found (parquet or arrow files, dataset_dict.json, or an "
                "image folder with metadata.jsonl)",
                details=[problem(".", "no Hugging Face dataset files", "format_not_recognised")],
            )
    else:  # pragma: no cover  (the schema allows only the three)
        raise _unknown_format(options.format)


def prepare_dataset(
    root: Path, options: DatasetOptions, out_dir: Path, cache_root: Path, *, annotation_max_bytes: int
) -> PreparedDataset:
    """Validate the dataset and write the sanitized COCO files training reads into `out_dir`.

    `cache_root` is where HF images are decoded once per dataset version; annotation files larger than
    `annotation_max_bytes` (the setting) are refused unread. Raises `DatasetError` with every problem
    found, each naming its file.
    """
    if options.format == "coco":
        train, val = resolve_coco_splits(root, options.coco_train, options.coco_val)
        return prepare_coco_dataset(root, train, val, out_dir, annotation_max_bytes=annotation_max_bytes)
    if options.format == "yolo":
        return yolo.prepare_yolo_dataset(
            root, options.data_yaml, out_dir, annotation_max_bytes=annotation_max_bytes
        )
    if options.format == "hf":
        return hf.prepare_hf_dataset(
            hf_root(root),
            bbox_format=options.bbox_format or hf.DEFAULT_BBOX_FORMAT,
            train_split=options.hf_train,
            val_split=options.hf_val,
            out_dir=out_dir,
            cache_root=cache_root,
            annotation_max_bytes=annotation_max_bytes,
        )
    raise _unknown_format(options.format)


def _unknown_format(name: str) -> DatasetError:
    text = f"unknown dataset format {name!r}"
    return DatasetError(text, details=[problem(".", text, "format_not_recognised")])


def validate_dataset(
    root: Path, options: DatasetOptions, cache_root: Path, *, annotation_max_bytes: int
) -> dict[str, Any]:
    """The validation report (never raises for a bad dataset: its problems are in the report).

    `{"format", "ok", "classes", "splits": {"train": {images, images_without_boxes, boxes,
    crowd_boxes, boxes_per_class, classes_without_boxes}, "val": {...}}, "errors", "warnings",
    "problems": [{"file", "problem", "severity", "code"}]}`; the codes are
    `app.datasets.problems.ERROR_CODES` and `WARNING_CODES`.
    """
    report: dict[str, Any] = {"format": options.format, "ok": False, "classes": [], "splits": {}}
    problems: list[dict[str, str]]
    with tempfile.TemporaryDirectory(prefix="sgjobs-validate-") as tmp:
        try:
            prepared = prepare_dataset(
                root, options, Path(tmp), cache_root, annotation_max_bytes=annotation_max_bytes
            )
        except DatasetError as exc:
            problems = exc.details if isinstance(exc.details, list) else []
            if not problems:
                problems = [{"file": ".", "problem": exc.message, "severity": "error"}]
            if isinstance(exc, InvalidDataset):
                report["classes"] = list(exc.class_names)
                report["splits"] = {name: s.to_dict() for name, s in exc.stats.items()}
        else:
            report["ok"] = True
            report["classes"] = list(prepared.class_names)
            report["splits"] = {name: s.to_dict() for name, s in prepared.stats.items()}
            problems = list(prepared.warning_details)
    # Every problem has a code, also one raised without (a DatasetError from outside this package).
    report["problems"] = [p if "code" in p else {**p, "code": FALLBACK_CODE} for p in problems]
    report["errors"] = sum(1 for p in problems if p.get("severity") == "error")
    report["warnings"] = sum(1 for p in problems if p.get("severity") == "warning")
    return report
