"""The public contract of jobs: the spec people POST and what the API answers."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.ml.types import DETECTION_METRICS, WATCHABLE_METRICS, ModelName


class StrictModel(BaseModel):
    # Unknown fields are a 422: a typo in a spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


def _relative_path(value: str) -> str:
    path = PurePosixPath(value.replace("\\", "/"))
    if not value.strip():
        raise ValueError("must not be empty")
    if path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a path relative to the datasets directory, without '..'")
    return str(path)


class SplitSpec(StrictModel):
    images: str = Field(description="Images folder, relative to the dataset root.")
    annotations: str = Field(description="COCO annotation JSON, relative to the dataset root.")

    _check_images = field_validator("images", "annotations")(_relative_path)


class HfSplits(StrictModel):
    train: str | None = Field(default=None, min_length=1, max_length=200, description="Default: train.")
    val: str | None = Field(
        default=None, min_length=1, max_length=200, description="Default: validation, else valid, val, test."
    )


# Which options belong to which format: using one with another format is a 422, not silently ignored.
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "coco": ("train", "val"),
    "hf": ("bbox_format", "splits"),
    "yolo": ("data_yaml",),
}


class DatasetSpec(StrictModel):
    format: Literal["coco", "hf", "yolo"] | None = Field(
        default=None, description="coco, hf or yolo; may be left out with `id` (the registered format)."
    )
    path: str | None = Field(
        default=None, description="Dataset root, relative to the server's datasets directory."
    )
    id: str | None = Field(
        default=None, min_length=1, max_length=64, description="A registered dataset (POST /datasets)."
    )
    # coco
    train: SplitSpec | None = Field(default=None, description="coco: default Roboflow layout, train/.")
    val: SplitSpec | None = Field(default=None, description="coco: default valid/, else val/, else test/.")
    # hf
    bbox_format: Literal["xyxy", "xywh", "cxcywh"] | None = Field(
        default=None, description="hf: box format in pixels; default xywh (COCO's x, y, width, height)."
    )
    splits: HfSplits | None = Field(default=None, description="hf: the dataset's split names.")
    # yolo
    data_yaml: str | None = Field(
        default=None, description="yolo: default data.yaml (or the only *.yaml) in the dataset root."
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
            for other, names in _FORMAT_FIELDS.items()
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
            owner = next(f for f, names in _FORMAT_FIELDS.items() if name in names)
            raise ValueError(f"{name} applies to format {owner!r} only, not {self.format!r}")
        return self


class TrainingSpec(StrictModel):
    """The seed's training parameters and defaults."""

    max_epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=512)
    initial_lr: float = Field(default=5e-4, gt=0, le=1)
    warmup_initial_lr: float = Field(default=1e-5, ge=0, le=1)
    lr_warmup_epochs: int = Field(default=1, ge=0, le=100)
    lr_mode: Literal["cosine", "poly"] = "cosine"
    cosine_final_lr_ratio: float = Field(default=0.5, ge=0, le=1)
    optimizer: Literal["AdamW", "Adam", "SGD", "RMSprop"] = "AdamW"
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    zero_weight_decay_on_bias_and_bn: bool = True
    ema: bool = False
    ema_beta: float = Field(default=25.0, gt=0, le=1000)
    average_best_models: bool = True
    mixed_precision: bool = Field(default=True, description="Used on CUDA only; ignored on the CPU.")
    metric_to_watch: str = Field(default="mAP@0.50", description="One of: " + ", ".join(WATCHABLE_METRICS))
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @field_validator("metric_to_watch")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in WATCHABLE_METRICS:
            raise ValueError(
                f"{value!r} is not produced by PPYoloELoss or DetectionMetrics_050; "
                f"use one of: {', '.join(WATCHABLE_METRICS)}"
            )
        return value

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSpec:
        if self.lr_warmup_epochs >= self.max_epochs and self.lr_warmup_epochs > 0:
            raise ValueError("lr_warmup_epochs must be smaller than max_epochs")
        return self

    @property
    def greater_is_better(self) -> bool:
        return self.metric_to_watch in DETECTION_METRICS


class InitFrom(StrictModel):
    job_id: str = Field(
        min_length=1, max_length=64, description="A succeeded job whose best checkpoint to start from."
    )


class JobSpec(StrictModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    model: ModelName
    dataset: DatasetSpec
    input_size: tuple[int, int] = Field(default=(640, 640), description="Height, width; multiples of 32.")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    init_from: InitFrom | None = None

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        for side in value:
            if side < 32 or side > 2048 or side % 32:
                raise ValueError("each side must be a multiple of 32 between 32 and 2048")
        return value


class Progress(BaseModel):
    epoch: int | None = None
    max_epochs: int
    batch: int | None = None
    batches_per_epoch: int | None = None
    percent: float = 0.0
    eta_seconds: float | None = None


class BestMetric(BaseModel):
    name: str
    value: float | None = None


class JobError(BaseModel):
    reason: str
    message: str


class JobOut(BaseModel):
    id: str
    name: str | None
    status: str
    model: str
    classes: list[str] | None
    progress: Progress
    best_metric: BestMetric
    error: JobError | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    device: str | None
    job_dir: str | None
    artifacts: dict[str, str]
    spec: dict[str, Any]


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricOut(BaseModel):
    name: str
    epoch: int | None
    step: int | None
    value: float
    time: datetime


class MetricPage(BaseModel):
    items: list[MetricOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get only newer points.")


class EventOut(BaseModel):
    id: int
    time: datetime
    kind: str
    level: str
    message: str
    data: dict[str, Any] | None = None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None
