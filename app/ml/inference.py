"""Prediction with trained checkpoints: an LRU of models, each with one ready (fused) SG pipeline.

This module runs inside the inference process (`app.ml.model_server`), never in the API process:
importing super-gradients replaces stdout/stderr, the root logger's handlers and the excepthook.
torch and super-gradients are imported inside functions only.

super-gradients' own `model.predict` re-fuses (or deep-copies) the model on every call (its
`lru_cache` on `_get_pipeline` holds one entry for the whole class, keyed on thresholds, and the
fused copy lives in the pipeline it throws away), so each model here keeps the pipeline it built
once and only the thresholds of its post-prediction callback change per request.

Two backends: a checkpoint with a current serving ONNX file (`app.ml.layout.serving_onnx_path`,
written by `app.ml.export.export_for_serving`) is served by onnxruntime (`app.ml.ort`, no torch and
no SG imported); any other (no file, a stale one, one that does not load) by SG's PyTorch pipeline.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np

from app.ml.layout import serving_onnx_path
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_BATCH_IMAGES

logger = logging.getLogger(__name__)

# The backends a model is served by (`LoadedModel.backend`, `PredictOutcome.backend`).
ONNXRUNTIME = "onnxruntime"
PYTORCH = "pytorch"


class InferOptions(TypedDict, total=False):
    """The keyword options of `ModelCache.infer`, passed on unchanged by `ModelCache.predict`."""

    conf: float
    iou: float
    image_format: str | None


class ModelLoadError(Exception):
    """The checkpoint cannot be turned into a model (corrupt, half-written, not YOLO-NAS)."""


@dataclass(frozen=True)
class ModelKey:
    """A checkpoint file as it is now: a rewritten file (a running job's new best) is a new model.

    `class_names`: the names to use when the file carries none (registered weights, see `load_model`).
    """

    model: str
    checkpoint: str
    mtime_ns: int
    size: int
    class_names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, model: str, checkpoint: Path, class_names: list[str] | None = None) -> ModelKey:
        """The key of `checkpoint` as found on disk now."""
        stat = checkpoint.stat()
        return cls(
            model=model,
            checkpoint=str(checkpoint),
            mtime_ns=stat.st_mtime_ns,
            size=stat.st_size,
            class_names=tuple(class_names) if class_names is not None else None,
        )


@dataclass
class LoadedModel:
    """A model ready to answer, and the class names its checkpoint carries.

    `backend`: ONNXRUNTIME (`model` is an `app.ml.ort.OrtModel`, `pipeline` None) or PYTORCH (`model`
    is SG's model, `pipeline` the held fused pipeline). `nbytes`: the memory it holds, roughly.
    """

    key: ModelKey
    model: Any
    pipeline: Any
    class_names: list[str]
    load_seconds: float
    backend: str = PYTORCH
    nbytes: int = 0


@dataclass
class Detection:
    """One box in the original image's pixels."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str


@dataclass
class ImageResult:
    """Detections for one image, and the drawn image when it was asked for."""

    width: int
    height: int
    detections: list[Detection]
    rendered: bytes | None = None


@dataclass
class PredictOutcome:
    """What one predict call answers."""

    results: list[ImageResult]
    class_names: list[str]
    cached: bool
    model_loads: int
    seconds: float
    backend: str = PYTORCH


def load_model(
    model_name: str,
    checkpoint: Path,
    device: str = "cpu",
    class_names: list[str] | tuple[str, ...] | None = None,
) -> tuple[Any, list[str]]:
    """Build `model_name` with the weights and processing params (class names, preprocessing) of
    `checkpoint`, in eval mode on `device`; returns it and its class names. Raises ModelLoadError
    when the file cannot be used.

    A file that carries no processing params (super-gradients' published COCO weights, a bare state
    dict) gets `class_names` and SG's own YOLO-NAS preprocessing for pretrained weights, as
    `models.get(..., pretrained_weights="coco")` would give it.
    """
    from super_gradients.training import models

    from app.ml.architectures import CLS_PRED_KEY
    from app.ml.checkpoints import load_checkpoint, model_state, sg_safe_globals

    try:
        ckpt = load_checkpoint(checkpoint)
        processing = dict(ckpt.get("processing_params") or {})
        num_classes = int(model_state(ckpt)[1][CLS_PRED_KEY].shape[0])
        del ckpt  # the optimizer state is as large as the model; do not hold both
        with sg_safe_globals():
            model = models.get(
                model_name, num_classes=num_classes, checkpoint_path=str(checkpoint), pretrained_weights=None
            )
    except Exception as exc:  # torch/SG raise many types for a bad file
        raise ModelLoadError(f"cannot load checkpoint {checkpoint.name}: {exc}") from exc
    if processing.get("image_processor") is None and class_names:
        from super_gradients.training.processing.processing import default_yolo_nas_coco_processing_params

        processing = {**default_yolo_nas_coco_processing_params(), "class_names": list(class_names)}
        model.set_dataset_processing_params(**processing)
    names = [str(name) for name in processing.get("class_names") or []]
    if not names or processing.get("image_processor") is None:
        raise ModelLoadError(f"checkpoint {checkpoint.name} carries no class names or preprocessing")
    if len(names) != num_classes:
        raise ModelLoadError(f"checkpoint {checkpoint.name}: {len(names)} names for {num_classes} classes")
    model.eval()
    if device != "cpu":
        model = model.to(device)
    return model, names


def build_pipeline(model: Any, *, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU) -> Any:
    """A fused detection pipeline to hold and call many times (see the module docstring).

    fp16 when the model is on a CUDA device (whether or not the machine has CUDA: a model the
    configuration put on the CPU stays fp32); on the CPU autocast would be a no-op with a warning.
    """
    on_cuda = next(model.parameters()).device.type == "cuda"
    pipeline = model._get_pipeline(conf=conf, iou=iou, fuse_model=True, fp16=on_cuda)
    # `_get_pipeline` is an lru_cache on the class: drop its entry so it does not pin this model
    # (and its fused copy) after we evict it from our own LRU.
    type(model)._get_pipeline.cache_clear()
    return pipeline


def set_thresholds(pipeline: Any, *, conf: float, iou: float) -> None:
    """Change the score and NMS thresholds of a held pipeline (one batch at a time per model, on its
    runner thread)."""
    callback = pipeline.post_prediction_callback
    callback.score_threshold = float(conf)
    callback.nms_threshold = float(iou)


def run_pipeline(pipeline: Any, images: list[np.ndarray]) -> list[Any]:
    """All `images` (HWC RGB uint8) through the model as one batch; one SG prediction per image."""
    result = pipeline(images, batch_size=len(images))
    if hasattr(result, "_images_prediction_lst"):
        return list(result._images_prediction_lst)
    return [result]


# Distinct colours for the first classes; more classes cycle.
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
]


def render(image: np.ndarray, detections: list[Detection], image_format: str) -> bytes:
    """`image` (HWC RGB) with boxes and labels drawn, encoded as JPEG or PNG.

    Drawn with PIL rather than SG's `draw()`, which calls `matplotlib.cm.get_cmap` (removed in
    matplotlib 3.9).
    """
    from PIL import Image, ImageDraw

    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)
    width = max(1, round(min(pil.size) / 200))
    for det in detections:
        colour = _PALETTE[det.class_id % len(_PALETTE)]
        draw.rectangle(det.box, outline=colour, width=width)
        label = f"{det.class_name} {det.score:.2f}"
        left, top = det.box[0], max(0.0, det.box[1] - 11)
        text_box = draw.textbbox((left, top), label)
        draw.rectangle(text_box, fill=colour)
        draw.text((left, top), label, fill=(255, 255, 255))
    buffer = io.BytesIO()
    if image_format == "png":
        pil.save(buffer, format="PNG")
    else:
        pil.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_result(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    image_format: str | None,
) -> ImageResult:
    """Plain data from detections in `image`'s pixels (either backend), boxes clipped to the image
    (SG does not clip)."""
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    detections = [
        Detection(
            box=(float(x1), float(y1), float(x2), float(y2)),
            score=float(score),
            class_id=int(label),
            class_name=class_names[int(label)],
        )
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True)
    ]
    rendered = render(image, detections, image_format) if image_format else None
    return ImageResult(width=int(width), height=int(height), detections=detections, rendered=rendered)


def to_result(prediction: Any, class_names: list[str], *, image_format: str | None) -> ImageResult:
    """Plain data from an SG `ImageDetectionPrediction` (SG already maps boxes back to the original
    image's pixels)."""
    pred = prediction.prediction
    return image_result(
        prediction.image,
        pred.bboxes_xyxy,
        pred.confidence,
        pred.labels,
        class_names,
        image_format=image_format,
    )


def load_serving(
    key: ModelKey, device: str, threads: int | None = None, max_batch: int = DEFAULT_MAX_BATCH_IMAGES
) -> Any | None:
    """The checkpoint's serving ONNX file in onnxruntime (an `app.ml.ort.OrtModel`), or None when
    there is none at least as new as the checkpoint, or it cannot serve (logged; the PyTorch path
    serves then)."""
    from app.ml.ort import OrtModel, ServingFileError

    path = serving_onnx_path(Path(key.checkpoint))
    try:
        if path.stat().st_mtime_ns < key.mtime_ns:
            return None  # a rewritten checkpoint (a running job's new best): the file is stale
    except FileNotFoundError:
        return None
    try:
        loaded = OrtModel.load(path, device=device, threads=threads, max_batch=max_batch)
    except ServingFileError as exc:
        logger.warning("serving %s with pytorch: %s", key.checkpoint, exc)
        return None
    if key.class_names is not None and len(key.class_names) != len(loaded.spec.class_names):
        logger.warning("serving %s with pytorch: the ONNX file has other classes", key.checkpoint)
        return None
    return loaded


def _torch_nbytes(model: Any) -> int:
    # The model and the fused copy its pipeline holds: about twice the parameters and buffers.
    tensors = [*model.parameters(), *model.buffers()]
    return 2 * sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class InferenceEngine:
    """The LRU of ready models of one inference process, bounded by count (`capacity`) and by
    memory (`max_bytes`, roughly: see `LoadedModel.nbytes`); the most recently used model stays even
    when it alone is over `max_bytes`.

    `get` is not thread-safe (the caller serializes it); `infer` may run in several threads at
    once for different models (one thread per model at a time).
    """

    capacity: int
    device: str = "cpu"
    # None: bounded by count only (the inference process passes `Settings.predict_cache_max_bytes`).
    max_bytes: int | None = None
    # onnxruntime's intra-op threads per session; None: os.cpu_count().
    ort_threads: int | None = None
    # The most images a batch holds (`Settings.predict_max_batch_images`): TensorRT's engines cover it.
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    # Called once before the first model loads on the PyTorch path (the inference process makes
    # super-gradients' device there, so that serving ONNX files alone never imports torch or SG).
    prepare_torch: Callable[[], object] | None = None
    loads: int = 0
    _models: OrderedDict[ModelKey, LoadedModel] = field(default_factory=OrderedDict)
    _torch_lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: ModelKey) -> tuple[LoadedModel, bool]:
        """The model for `key` and whether it was already loaded; loads (and evicts) otherwise."""
        loaded = self._models.get(key)
        if loaded is not None:
            self._models.move_to_end(key)
            return loaded, True
        # Another version of the same checkpoint file is stale now.
        for old in [k for k in self._models if k.checkpoint == key.checkpoint]:
            del self._models[old]
        # Room before loading, so the held models and the new one never exceed the bounds together
        # (by count; by memory as far as the old ones go).
        self._evict(room_for=1)
        start = time.perf_counter()
        loaded = self._load(key, start)
        self.loads += 1
        self._models[key] = loaded
        self._evict(room_for=0)
        logger.info(
            "loaded %s with %s in %.2f s (load #%d)",
            key.checkpoint,
            loaded.backend,
            loaded.load_seconds,
            self.loads,
        )
        return loaded, False

    def _load(self, key: ModelKey, start: float) -> LoadedModel:
        served = load_serving(key, self.device, self.ort_threads, self.max_batch_images)
        if served is not None:
            return LoadedModel(
                key=key,
                model=served,
                pipeline=None,
                class_names=served.spec.class_names,
                load_seconds=time.perf_counter() - start,
                backend=ONNXRUNTIME,
                nbytes=served.path.stat().st_size,
            )
        self.ensure_torch()
        model, class_names = load_model(key.model, Path(key.checkpoint), self.device, key.class_names)
        pipeline = build_pipeline(model)
        return LoadedModel(
            key=key,
            model=model,
            pipeline=pipeline,
            class_names=class_names,
            load_seconds=time.perf_counter() - start,
            backend=PYTORCH,
            nbytes=_torch_nbytes(model),
        )

    def ensure_torch(self) -> None:
        """Run `prepare_torch` if it has not run yet (before anything here uses torch or SG)."""
        with self._torch_lock:
            if self.prepare_torch is not None:
                self.prepare_torch()
                self.prepare_torch = None

    def _evict(self, *, room_for: int) -> None:
        """Drop least recently used models until `room_for` more fit within `capacity` and the held
        bytes are within `max_bytes`; after a load (`room_for=0`) never the model just loaded."""
        floor = 0 if room_for else 1
        while len(self._models) > floor and (
            len(self._models) + room_for > self.capacity
            or (self.max_bytes is not None and sum(m.nbytes for m in self._models.values()) > self.max_bytes)
        ):
            evicted, model = self._models.popitem(last=False)
            logger.info("evicted %s (%s, %d bytes)", evicted.checkpoint, model.backend, model.nbytes)

    def infer(
        self,
        loaded: LoadedModel,
        images: list[np.ndarray],
        *,
        conf: float = DEFAULT_CONF,
        iou: float = DEFAULT_IOU,
        image_format: str | None = None,
    ) -> tuple[list[ImageResult], float]:
        """Detections for `images` (HWC RGB uint8, one batch) with a model from `get`, and the
        seconds it took; with `image_format` ("jpeg" or "png") also each image with its boxes drawn.
        Safe in several threads for different models, not for one model."""
        start = time.perf_counter()
        if loaded.backend == ONNXRUNTIME:
            answers = loaded.model.predict(images, conf=conf, iou=iou)
            results = [
                image_result(image, boxes, scores, labels, loaded.class_names, image_format=image_format)
                for image, (boxes, scores, labels) in zip(images, answers, strict=True)
            ]
        else:
            set_thresholds(loaded.pipeline, conf=conf, iou=iou)
            predictions = run_pipeline(loaded.pipeline, images)
            results = [to_result(p, loaded.class_names, image_format=image_format) for p in predictions]
        return results, time.perf_counter() - start

    def predict(
        self, key: ModelKey, images: list[np.ndarray], **options: Unpack[InferOptions]
    ) -> PredictOutcome:
        """Detections for `images` (HWC RGB uint8) with the model of `key` (`get` then `infer`,
        which takes the same `options` and holds their defaults)."""
        loaded, cached = self.get(key)
        results, seconds = self.infer(loaded, images, **options)
        return PredictOutcome(
            results=results,
            class_names=loaded.class_names,
            cached=cached,
            model_loads=self.loads,
            seconds=seconds,
            backend=loaded.backend,
        )

    def stats(self) -> dict[str, Any]:
        """Loads so far and what is held now (backend, approximate bytes), most recently used last."""
        return {
            "device": self.device,
            "model_loads": self.loads,
            "capacity": self.capacity,
            "max_bytes": self.max_bytes,
            "held_bytes": sum(m.nbytes for m in self._models.values()),
            "cached_models": [
                {
                    "model": k.model,
                    "checkpoint": k.checkpoint,
                    "load_seconds": round(m.load_seconds, 3),
                    "backend": m.backend,
                    "nbytes": m.nbytes,
                }
                for k, m in self._models.items()
            ],
        }
