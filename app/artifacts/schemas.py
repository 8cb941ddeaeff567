"""A job's files and its ONNX export."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
