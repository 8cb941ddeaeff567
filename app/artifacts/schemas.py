"""A job's files and its ONNX export."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.ml.types import DEFAULT_CONF, DEFAULT_IOU

# YOLO-NAS downsamples by 32: a side must be a multiple of it.
EXPORT_SIDE_MULTIPLE = 32
ExportSide = Annotated[int, Field(ge=32, le=2048, multiple_of=EXPORT_SIDE_MULTIPLE)]


class Artifact(BaseModel):
    """One downloadable file; `name` is its path inside the job directory."""

    name: str
    kind: str = Field(description="ckpt_best, ckpt_latest, average_model, console_log, tensorboard or onnx")
    size: int
    url: str


class ArtifactList(BaseModel):
    job_id: str
    status: str
    items: list[Artifact]


class ExportOptions(BaseModel):
    """How to export: each option left out keeps today's export (the training input size, batch 1,
    conf 0.25, iou 0.65, fp32). Each set of options has a file of its own."""

    # Strict: a value of another JSON type than the document's (`"0.5"`, `false`, `1.0` for an
    # integer) is a 422, never converted.
    model_config = ConfigDict(extra="forbid", strict=True)

    input_size: list[ExportSide] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[H, W] of the exported input, multiples of 32; default the training size.",
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Images per call of the exported model. batch_size x H x W may be at most the "
        "server's export_max_pixels setting; more is a 422.",
    )
    conf: float = Field(default=DEFAULT_CONF, ge=0.0, le=1.0, description="Score threshold inside the model.")
    iou: float = Field(default=DEFAULT_IOU, gt=0.0, le=1.0, description="NMS IoU threshold inside the model.")
    fp16: bool = Field(default=False, description="Half-precision weights; needs a server with a CUDA GPU.")


class ExportOut(BaseModel):
    """The exported ONNX model: one uint8 RGB image [1, 3, H, W] in; num_predictions, boxes
    (x1, y1, x2, y2 in the H x W input's pixels), scores and classes out."""

    job_id: str | None = Field(default=None, description="The exported job (or null).")
    weights_id: str | None = Field(default=None, description="The exported weights (or null).")
    artifact: Artifact
    cached: bool = Field(description="An existing export of the same checkpoint was returned.")
    seconds: float
    input_shape: list[int]
    input_dtype: str
    outputs: list[str]
    classes: list[str]
    conf: float
    iou: float
