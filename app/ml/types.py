"""Plain data passed between the service and the training backend (no torch imports here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

ModelName = Literal["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"]

# What PPYoloELoss and DetectionMetrics_050 produce; `metric_to_watch` must be one of these.
LOSS_COMPONENTS: tuple[str, ...] = (
    "PPYoloELoss/loss_cls",
    "PPYoloELoss/loss_iou",
    "PPYoloELoss/loss_dfl",
    "PPYoloELoss/loss",
)
DETECTION_METRICS: tuple[str, ...] = ("Precision@0.50", "Recall@0.50", "mAP@0.50", "F1@0.50")
WATCHABLE_METRICS: tuple[str, ...] = DETECTION_METRICS + LOSS_COMPONENTS


@dataclass(frozen=True)
class SplitFiles:
    """One split, already validated: images folder and a sanitized COCO annotation file.

    The sanitized file has categories with ids 0..n-1 in class order, plain-`str` names, boxes
    clipped to the image and no degenerate boxes, so super-gradients cannot mislabel anything.
    """

    images_dir: Path
    annotation_file: Path
    num_images: int


@dataclass(frozen=True)
class TrainingParams:
    """The seed's training parameters (defaults are the seed's values)."""

    max_epochs: int = 10
    batch_size: int = 16
    initial_lr: float = 5e-4
    warmup_initial_lr: float = 1e-5
    lr_warmup_epochs: int = 1
    lr_mode: str = "cosine"
    cosine_final_lr_ratio: float = 0.5
    optimizer: str = "AdamW"
    weight_decay: float = 1e-4
    zero_weight_decay_on_bias_and_bn: bool = True
    ema: bool = False
    ema_beta: float = 25.0
    average_best_models: bool = True
    mixed_precision: bool = True
    metric_to_watch: str = "mAP@0.50"
    num_workers: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run needs; built by the worker from the job spec."""

    job_id: str
    model: str
    job_dir: Path
    class_names: tuple[str, ...]
    train: SplitFiles
    val: SplitFiles
    input_size: tuple[int, int]
    params: TrainingParams = field(default_factory=TrainingParams)
    init_checkpoint: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class MetricPoint:
    """One scalar: `epoch` for per-epoch series, `step` (global batch index) for per-batch ones."""

    name: str
    value: float
    epoch: int | None = None
    step: int | None = None
    time: datetime | None = None


@dataclass
class TrainingResult:
    """What a finished (or cancelled) run leaves behind."""

    best_metric_name: str
    best_metric_value: float | None
    checkpoints: dict[str, Path]
    epochs_completed: int
    device: str


class TrainingCancelled(Exception):
    """Raised from inside a training callback to stop within one batch (SG's flag waits an epoch)."""


class Reporter(Protocol):
    """How the training backend talks to the service. Implementations batch and throttle writes."""

    def metrics(self, points: list[MetricPoint]) -> None:
        """Record scalars (may be buffered)."""

    def progress(self, *, epoch: int, max_epochs: int, batch: int, batches_per_epoch: int) -> None:
        """Record where training is (may be buffered)."""

    def event(self, message: str, *, level: str = "info") -> None:
        """Record a log line on the job."""

    def should_stop(self) -> bool:
        """True once a cancel was requested; cheap to call every batch (throttled inside)."""

    def flush(self) -> None:
        """Write everything buffered now."""
