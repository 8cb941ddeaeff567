"""What /predict answers."""

from __future__ import annotations

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
    inference_ms: float = Field(description="Time in the model pipeline (preprocess, forward, NMS).")


class CachedModel(BaseModel):
    model: str
    checkpoint: str
    load_seconds: float


class PredictStats(BaseModel):
    """The inference process: whether it runs, how many checkpoints it loaded, what it holds."""

    running: bool
    pid: int | None
    process_starts: int
    model_loads: int
    capacity: int
    cached_models: list[CachedModel]
