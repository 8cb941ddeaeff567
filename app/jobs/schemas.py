"""The public contract of jobs: the spec people POST and what the API answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator

from app.datasets.schemas import DatasetSpec
from app.jobs.models import FailureReason, JobStatus
from app.ml.params import TrainingSpec
from app.ml.types import ModelName, PretrainedName
from app.schemas import ID_MAX_LENGTH, ID_PATTERN, PRINTABLE_PATTERN, Page, StrictModel
from app.settings import POOL_PATTERN


class InitFrom(StrictModel):
    """Where the weights start: exactly one of another job's checkpoint, registered weights, or
    super-gradients' published weights (their file in the weights folder). The number of classes may
    differ from the dataset's (the head is re-initialised); the architecture must be the job's."""

    job_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="A finished job whose best checkpoint (else latest) to start from.",
    )
    weights_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="Registered weights (POST /weights) to start from.",
    )
    pretrained: PretrainedName | None = Field(
        default=None,
        description="Published weights, as SG's pretrained_weights: the file <model>_<name>.pth "
        "(e.g. yolo_nas_s_coco.pth) in the server's weights folder.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> InitFrom:
        given = [name for name in ("job_id", "weights_id", "pretrained") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of job_id, weights_id or pretrained"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class WebhookSpec(StrictModel):
    """Where to POST a signed JSON message each time the job ends (succeeded, failed, cancelled)."""

    url: HttpUrl = Field(
        description="An http(s) URL whose host is in the server's SGJOBS_WEBHOOK_ALLOWED_HOSTS (else 422). "
        "The message is signed: X-Sgjobs-Signature: sha256=<hex HMAC-SHA256 of the body>.",
    )


class JobSpec(StrictModel):
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=PRINTABLE_PATTERN)
    model: ModelName
    dataset: DatasetSpec
    input_size: tuple[int, int] = Field(default=(640, 640), description="Height, width; multiples of 32.")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    init_from: InitFrom | None = None
    max_restarts: int = Field(
        default=2,
        ge=0,
        description="Lost attempts (worker killed, machine gone) resumed automatically from the last "
        "checkpoint before the job fails as worker_lost; at most the server's SGJOBS_MAX_RESTARTS_LIMIT.",
    )
    webhook: WebhookSpec | None = Field(default=None, description="A message when the job ends.")
    queue: str | None = Field(
        default=None,
        pattern=POOL_PATTERN,
        description="The pool of workers to run on (a name such as `big-gpu`; workers serve a pool with "
        "`sgjobs worker --queue NAME` or SGJOBS_WORKER_QUEUE). Default: the default pool. A job for a "
        "pool with no live worker stays queued until one starts.",
    )
    gpus: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs the job trains on, data-parallel (super-gradients' DDP, one process per GPU, "
        "metrics and cancel through the first); `training.batch_size` is per GPU. More than the "
        "largest live worker of its pool offers (`sgjobs worker --gpus-per-slot`) is a 422 naming "
        "that number (with no live worker in the pool, only 1 is accepted: a worker may start later).",
    )

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        for side in value:
            if side < 32 or side > 2048 or side % 32:
                raise ValueError("each side must be a multiple of 32 between 32 and 2048")
        return value


# TrainingSpec's bound on max_epochs, so a resumed job can never be asked for more than a new one.
MAX_EPOCHS_LIMIT: int = next(
    int(m.le) for m in TrainingSpec.model_fields["max_epochs"].metadata if getattr(m, "le", None) is not None
)


class ResumeRequest(StrictModel):
    """How to continue a cancelled or failed job: optionally with more epochs."""

    max_epochs: int | None = Field(
        default=None,
        ge=1,
        le=MAX_EPOCHS_LIMIT,
        description="The new total number of epochs: at least the job's current max_epochs "
        "(default: unchanged).",
    )


class Progress(BaseModel):
    """Where training is: 0-based epoch, batches finished in it, and an estimate of the time left."""

    epoch: int | None = None
    max_epochs: int
    batch: int | None = None
    batches_per_epoch: int | None = None
    percent: float = 0.0
    eta_seconds: float | None = None


class BestMetric(BaseModel):
    """The watched metric's best value so far (the one ckpt_best.pth was saved for)."""

    name: str
    value: float | None = None


class JobError(BaseModel):
    """Why a job failed (`reason`) and what to do about it (`message`)."""

    reason: FailureReason
    message: str


class StartedFrom(BaseModel):
    """What the job's weights started from; `checkpoint` and `num_classes` (the checkpoint's, whose
    head is re-initialised when the dataset has another count) are filled in when training starts."""

    job_id: str | None = Field(default=None, description="The job whose checkpoint it started from.")
    weights_id: str | None = Field(default=None, description="The registered weights it started from.")
    pretrained: str | None = Field(default=None, description="The published weights asked for (`coco`).")
    name: str | None = Field(default=None, description="The weights' name.")
    sha256: str | None = Field(default=None, description="The weights file's SHA-256.")
    checkpoint: str | None = Field(default=None, description="The file the training loaded.")
    num_classes: int | None = Field(default=None, description="The checkpoint's number of classes.")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    tenant: str = Field(description="The tenant the job belongs to.")
    name: str | None
    status: JobStatus
    model: ModelName
    classes: list[str] | None
    progress: Progress
    best_metric: BestMetric
    error: JobError | None
    cancel_requested: bool
    attempt: int = Field(description="Attempts claimed so far (1 for a job that ran once; 0: never ran).")
    restarts: int = Field(description="Lost attempts resumed automatically (at most spec.max_restarts).")
    worker: str | None = Field(description="The worker of the current (or last) attempt.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    device: str | None
    job_dir: str | None = Field(
        description="The job's directory on the worker (admins only; null for others)."
    )
    artifacts: dict[str, str] = Field(description="Files the job left, by kind (see /jobs/{id}/artifacts).")
    started_from: StartedFrom | None = Field(description="Where the weights started; null: random weights.")
    spec: JobSpec


class JobPage(Page[JobOut]):
    """Jobs, newest first."""


class MetricOut(BaseModel):
    """One point: per-epoch series carry `epoch`, per-batch ones also the global `step`."""

    name: str
    epoch: int | None
    step: int | None
    value: float
    time: datetime


class MetricPage(BaseModel):
    """Metric points in the order they were recorded."""

    items: list[MetricOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get only newer points.")


class EventOut(BaseModel):
    """A state change, warning or log line of a job; `data` holds details such as dataset problems."""

    id: int
    time: datetime
    kind: str
    level: str
    message: str
    data: dict[str, Any] | None = None


class EventPage(BaseModel):
    """Events in the order they happened."""

    items: list[EventOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get only newer events.")
