"""What one training run is asked to do: the job spec's `training` section and the run's configuration.

`TrainingSpec` is the single definition of the training parameters, their defaults and bounds: the
API validates job specs with it (`app.jobs.schemas.JobSpec.training`) and the training backend reads
the same validated object. pydantic only; no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.ml.types import WATCHABLE_METRICS, SplitFiles


class TrainingSpec(BaseModel):
    """The seed's training parameters and defaults."""

    # Unknown fields are a 422: a typo in a spec must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

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


@dataclass(frozen=True)
class TrainingConfig:
    """Everything one training run needs; built by the worker from the job spec and the settings.

    `training` is the job spec's validated training section; `num_workers` (data loader processes)
    and `device` ("auto", "cpu" or "cuda"; see `app.ml.device`) come from the settings. Checkpoints
    and super-gradients' logs go under `job_dir` (see `app.ml.types.CHECKPOINTS_DIR`).
    """

    model: str
    job_dir: Path
    class_names: tuple[str, ...]
    train: SplitFiles
    val: SplitFiles
    input_size: tuple[int, int]
    training: TrainingSpec = field(default_factory=TrainingSpec)
    num_workers: int = 0
    init_checkpoint: Path | None = None
    # A checkpoint of this job's earlier attempt to continue from (SG's resume), chosen by
    # `app.ml.checkpoints.pick_resume_checkpoint`.
    resume_from: Path | None = None
    device: str = "auto"
    # Processes (one per GPU) training the job data-parallel (`app.ml.distributed`); 1: no DDP.
    # `training.batch_size` is per process, as in super-gradients: the effective batch is this times it.
    world_size: int = 1

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON values, for the other ranks of a data-parallel job (`from_json`)."""
        return {
            "model": self.model,
            "job_dir": str(self.job_dir),
            "class_names": list(self.class_names),
            "train": _split_json(self.train),
            "val": _split_json(self.val),
            "input_size": list(self.input_size),
            "training": self.training.model_dump(mode="json"),
            "num_workers": self.num_workers,
            "init_checkpoint": None if self.init_checkpoint is None else str(self.init_checkpoint),
            "resume_from": None if self.resume_from is None else str(self.resume_from),
            "device": self.device,
            "world_size": self.world_size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingConfig:
        """The configuration `to_json` wrote."""
        height, width = data["input_size"]
        return cls(
            model=data["model"],
            job_dir=Path(data["job_dir"]),
            class_names=tuple(data["class_names"]),
            train=_split_from_json(data["train"]),
            val=_split_from_json(data["val"]),
            input_size=(int(height), int(width)),
            training=TrainingSpec.model_validate(data["training"]),
            num_workers=int(data["num_workers"]),
            init_checkpoint=None if data["init_checkpoint"] is None else Path(data["init_checkpoint"]),
            resume_from=None if data["resume_from"] is None else Path(data["resume_from"]),
            device=data["device"],
            world_size=int(data["world_size"]),
        )


def _split_json(split: SplitFiles) -> dict[str, Any]:
    return {
        "images_dir": str(split.images_dir),
        "annotation_file": str(split.annotation_file),
        "num_images": split.num_images,
    }


def _split_from_json(data: dict[str, Any]) -> SplitFiles:
    return SplitFiles(
        images_dir=Path(data["images_dir"]),
        annotation_file=Path(data["annotation_file"]),
        num_images=int(data["num_images"]),
    )
