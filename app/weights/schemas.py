"""The public contract of weights: the upload form, the promote request, and what the API answers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.ml.types import ModelName
from app.schemas import ID_MAX_LENGTH, ID_PATTERN, PRINTABLE_PATTERN, Page, StrictModel
from app.weights.models import WeightsSource


class WeightsUploadForm(BaseModel):
    """The multipart form of `POST /weights` (streamed to disk by hand, to enforce the size limit)."""

    file: bytes = Field(
        description="A YOLO-NAS checkpoint (.pth): SG's `net`/`ema_net` or a bare state dict."
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=PRINTABLE_PATTERN,
        description="Default: the file's name.",
    )
    model: ModelName | None = Field(
        default=None, description="Expected architecture; recognised from the tensors either way."
    )


class PromoteRequest(StrictModel):
    """`POST /weights` as JSON: register a finished job's best checkpoint, with no download."""

    from_job: str = Field(
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description="A finished job whose best checkpoint to register.",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=PRINTABLE_PATTERN,
        description="Default: the job's name.",
    )


class WeightsOut(BaseModel):
    """Registered weights. `classes`: the names the file carries (COCO's for an 80-class file with
    none), else `class_0`, `class_1`, ..."""

    id: str
    tenant: str = Field(
        description="The tenant the weights belong to; `_published`: the operator's, for all."
    )
    name: str
    model: ModelName
    num_classes: int
    classes: list[str]
    size_bytes: int
    sha256: str
    source: WeightsSource = Field(description="upload, job (promoted) or folder (a published file)")
    job_id: str | None = Field(description="The job a promoted checkpoint came from.")
    pretrained: str | None = Field(description="For a published file: its dataset (`coco`, `objects365`).")
    created_at: datetime


class WeightsPage(Page[WeightsOut]):
    """Registered weights, newest first."""
