"""What /predict answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Detection(BaseModel):
    """One detected object; `box` is [x1, y1, x2, y2] in the original image's pixels."""

    box: list[float] = Field(min_length=4, max_length=4, description="[x1, y1, x2, y2], original pixels")
    score: float
    class_id: int
    class_name: str


class ImagePrediction(BaseModel):
    """The detections of one uploaded image."""

    file: str = Field(description="The uploaded file's name.")
    width: int
    height: int
    detections: list[Detection]


class PredictResponse(BaseModel):
    """Detections per image, in upload order, and whether the model was already loaded."""

    job_id: str | None = Field(description="The job whose best model predicted (or null).")
    weights_id: str | None = Field(description="The registered weights that predicted (or null).")
    model: str
    classes: list[str]
    conf: float
    iou: float
    images: list[ImagePrediction]
    cached: bool = Field(description="The model was already loaded (no checkpoint read for this request).")
    model_loads: int = Field(description="Checkpoints the inference process has loaded since it started.")
    inference_ms: float = Field(
        description="Time in the model pipeline (preprocess, forward, NMS) of the batch this request ran in."
    )
    batch_requests: int = Field(
        description="Requests that shared this one's forward pass, this one included (1: it ran alone)."
    )
    batch_images: int = Field(description="Images in that forward pass, this request's and the others'.")
    backend: Literal["onnxruntime", "pytorch"] = Field(
        description="What ran the model: onnxruntime on the job's serving export, or super-gradients' "
        "PyTorch pipeline (a model without one)."
    )


class CachedModel(BaseModel):
    model: str
    checkpoint: str
    load_seconds: float
    backend: str = Field(default="pytorch", description="onnxruntime or pytorch.")
    nbytes: int = Field(default=0, description="Memory the model holds, roughly.")


class PredictStats(BaseModel):
    """The inference process: whether it runs, how many checkpoints it loaded, what it holds."""

    running: bool
    pid: int | None
    process_starts: int
    model_loads: int
    capacity: int
    max_bytes: int | None = Field(default=None, description="The cache's memory bound (bytes).")
    held_bytes: int = Field(default=0, description="Memory the held models take, roughly.")
    cached_models: list[CachedModel]
    requests: int = Field(default=0, description="Predictions the running process received.")
    batches: int = Field(default=0, description="Forward passes that answered them.")
    merged_requests: int = Field(default=0, description="Requests that shared a forward pass with others.")
    largest_batch: int = Field(default=0, description="Requests in the largest forward pass.")
    running_models: int = Field(default=0, description="Models with predictions running or queued now.")
