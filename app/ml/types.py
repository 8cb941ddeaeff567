"""Plain data and constants shared by the service and the training backend (no torch imports here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

ModelName = Literal["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"]
# Datasets super-gradients published YOLO-NAS weights for, as its `pretrained_weights=` names them.
PretrainedName = Literal["coco", "objects365"]

# What PPYoloELoss and DetectionMetrics_050 produce; `metric_to_watch` must be one of these.
LOSS_COMPONENTS: tuple[str, ...] = (
    "PPYoloELoss/loss_cls",
    "PPYoloELoss/loss_iou",
    "PPYoloELoss/loss_dfl",
    "PPYoloELoss/loss",
)
DETECTION_METRICS: tuple[str, ...] = ("Precision@0.50", "Recall@0.50", "mAP@0.50", "F1@0.50")
WATCHABLE_METRICS: tuple[str, ...] = DETECTION_METRICS + LOSS_COMPONENTS


def greater_is_better(metric: str) -> bool:
    """True when a higher value of `metric` is better (the detection metrics); False for losses."""
    return metric in DETECTION_METRICS


# Prediction and export thresholds when the caller gives none. SG's checkpoints carry conf=0.5
# hard-coded by its Trainer (not a tuned value): answer with more boxes by default (0.25, the usual
# YOLO default) and let the caller raise it.
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.65


class ExportTooLarge(ValueError):
    """The export asked for is over the server's limit on pixels per call (the request's to change)."""


def check_export_pixels(batch_size: int, height: int, width: int, limit: int) -> None:
    """ExportTooLarge when `batch_size` images of `height` x `width` are more than `limit` pixels
    (`Settings.export_max_pixels`): tracing an export runs the model on a batch that size, and its
    memory grows with the pixels (about 150 bytes each for YOLO-NAS-S on the CPU)."""
    pixels = batch_size * height * width
    if pixels > limit:
        raise ExportTooLarge(
            f"an export of {batch_size} image(s) of {height}x{width} is {pixels:,} pixels per call, over "
            f"this server's limit of {limit:,} (export_max_pixels): ask for a smaller batch_size or "
            "input_size"
        )


# Images in one merged batch of /predict requests (`Settings.predict_max_batch_images`).
DEFAULT_MAX_BATCH_IMAGES = 16

# Where a training run puts super-gradients' output inside its directory (`TrainingConfig.job_dir`):
# the Trainer's `ckpt_root_dir` (checkpoints and TensorBoard files under `<experiment>/RUN_*/`) and
# SUPER_GRADIENTS_LOG_DIR. The rest of a job directory's layout is `app.jobs.files`.
CHECKPOINTS_DIR = "checkpoints"
# Per-batch series (written by the training callback) carry this prefix, never mixed with SG's
# per-epoch "Train_..." series; retention prunes them.
BATCH_PREFIX = "Batch_"
# The training's throughput, a per-batch series: images of the batch over the seconds since the
# previous batch ended (data loading, forward, backward, step). GET /metrics reads it.
IMAGES_PER_SECOND = BATCH_PREFIX + "images_per_second"
SG_LOG_DIR = "logs"


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
class MetricPoint:
    """One scalar: `epoch` for per-epoch series, `step` (global batch index) for per-batch ones."""

    name: str
    value: float
    epoch: int | None = None
    step: int | None = None
    time: datetime | None = None


@dataclass
class TrainingResult:
    """What a finished run reports (its files are found with `app.jobs.files`)."""

    best_metric_name: str
    best_metric_value: float | None
    epochs_completed: int
    device: str


@dataclass(frozen=True)
class CheckpointInfo:
    """What the inference process found in a weights file (`app.ml.weights.inspect_checkpoint`).

    `layout`: where the weights were in the file, as super-gradients reads them: `ema_net` (preferred
    by SG when present), `net` (SG's training checkpoints) or `state_dict` (a bare state dict).
    `class_names`: the names the file carries (SG's `processing_params`), COCO's for an 80-class file
    that carries none, else None. `processing_params`: the file carries SG's preprocessing.
    """

    model: ModelName
    num_classes: int
    class_names: list[str] | None
    layout: str
    processing_params: bool


class TrainingCancelled(Exception):
    """Raised from inside a training callback to stop within one batch (SG's flag waits an epoch)."""


class LeaseLost(Exception):
    """This attempt no longer holds the job's lease (it expired, or the job moved on): stop writing.

    Raised by the reporter and by checkpoint saves; the training process then exits without
    writing anything more into the job, its files included.
    """


class DiskFull(Exception):
    """A checkpoint could not be written for lack of space; the previous checkpoint is intact."""


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

    def holds_lease(self) -> bool:
        """Renew this attempt's lease now (one round trip); False once the job has moved on.

        Asked before a checkpoint is put in place, so a paused or partitioned process never
        replaces the files of the attempt that took over.
        """
