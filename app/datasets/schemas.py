"""The public contract of datasets: how a job spec names one, and what the API answers about them."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from app.errors import DatasetProblem
from app.paths import unsafe_relative
from app.schemas import ID_MAX_LENGTH, ID_PATTERN, Page, StrictModel

BboxFormat = Literal["xyxy", "xywh", "cxcywh"]
DatasetFormat = Literal["coco", "hf", "yolo"]


def _relative_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if unsafe_relative(value):
        raise ValueError("must be a path relative to the datasets directory, without '..'")
    return str(PurePosixPath(value.replace("\\", "/")))


class SplitSpec(StrictModel):
    images: str = Field(max_length=1000, description="Images folder, relative to the dataset root.")
    annotations: str = Field(
        max_length=1000, description="COCO annotation JSON, relative to the dataset root."
    )

    _check_paths = field_validator("images", "annotations")(_relative_path)


class HfSplits(StrictModel):
    train: str | None = Field(default=None, min_length=1, max_length=200, description="Default: train.")
    val: str | None = Field(
        default=None, min_length=1, max_length=200, description="Default: validation, else valid, val, test."
    )


# Which options belong to which format: using one with another format is a 422, not silently ignored.
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "coco": ("train", "val"),
    "hf": ("bbox_format", "splits"),
    "yolo": ("data_yaml",),
}


class DatasetSpec(StrictModel):
    """A job's dataset: a folder in the datasets directory (`path` and `format`) or a registered `id`."""

    format: DatasetFormat | None = Field(
        default=None, description="coco, hf or yolo; may be left out with `id` (the registered format)."
    )
    path: str | None = Field(
        default=None,
        max_length=1000,
        description="Dataset root, relative to the server's datasets directory.",
    )
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="A registered dataset (POST /datasets).",
    )
    # coco
    train: SplitSpec | None = Field(default=None, description="coco: default Roboflow layout, train/.")
    val: SplitSpec | None = Field(default=None, description="coco: default valid/, else val/, else test/.")
    # hf
    bbox_format: BboxFormat | None = Field(
        default=None, description="hf: box format in pixels; default xywh (COCO's x, y, width, height)."
    )
    splits: HfSplits | None = Field(default=None, description="hf: the dataset's split names.")
    # yolo
    data_yaml: str | None = Field(
        default=None,
        max_length=1000,
        description="yolo: default data.yaml (or the only *.yaml) in the dataset root.",
    )

    @field_validator("path", "data_yaml")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value)

    def misplaced_options(self, fmt: str | None) -> list[str]:
        """Options set that do not belong to `fmt` (none when the format is not known yet)."""
        if fmt is None:
            return []
        return [
            name
            for other, names in FORMAT_OPTIONS.items()
            if other != fmt
            for name in names
            if getattr(self, name) is not None
        ]

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if (self.path is None) == (self.id is None):
            raise ValueError("give exactly one of path (a folder in the datasets directory) or id")
        if self.format is None and self.id is None:
            raise ValueError("format is required with path (coco, hf or yolo)")
        for name in self.misplaced_options(self.format):
            owner = next(f for f, names in FORMAT_OPTIONS.items() if name in names)
            raise ValueError(f"{name} applies to format {owner!r} only, not {self.format!r}")
        return self


class SplitReport(BaseModel):
    """Counts for one split, after sanitizing (dropped boxes are not counted)."""

    images: int
    images_without_boxes: int
    boxes: int
    crowd_boxes: int
    boxes_per_class: dict[str, int]
    classes_without_boxes: list[str]


class ValidationReport(BaseModel):
    """What validating a dataset found: the classes, per-split counts and every problem."""

    format: str
    ok: bool = Field(description="No errors: jobs can train on it.")
    classes: list[str]
    splits: dict[str, SplitReport] = Field(description="`train` and `val` (as far as they could be read).")
    problems: list[DatasetProblem]
    errors: int
    warnings: int


class DatasetOptions(BaseModel):
    """Format options stored with a registered dataset (used by jobs that name it by id)."""

    bbox_format: BboxFormat | None = None


class DatasetOut(BaseModel):
    """A registered dataset and its last validation report."""

    id: str
    tenant: str = Field(description="The tenant the dataset belongs to.")
    name: str
    format: DatasetFormat
    path: str = Field(description="Its folder, relative to the datasets directory.")
    status: Literal["ready", "invalid"]
    options: DatasetOptions
    classes: list[str] | None
    archive_bytes: int
    size_bytes: int
    file_count: int
    created_at: datetime
    validated_at: datetime | None
    report: ValidationReport | None


class DatasetPage(Page[DatasetOut]):
    """Registered datasets, newest first."""


def report_model(report: dict[str, Any] | None) -> ValidationReport | None:
    """A stored report as its schema."""
    return None if report is None else ValidationReport.model_validate(report)
