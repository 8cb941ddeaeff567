"""Serving a YOLO-NAS model from its serving ONNX file with onnxruntime, without torch or SG.

The serving file (`app.ml.export.export_for_serving`) holds the network only: a float32 batch
[N, 3, H, W] in, decoded boxes [N, A, 4] (input pixels, xyxy) and class scores [N, A, C] out, with a
dynamic batch axis. Everything around it is here, in numpy and OpenCV, step for step as SG 3.7.1's
`DetectionPipeline` does it with the checkpoint's own processing params (written into the file's
metadata at export): the preprocessing (`training/processing/processing.py`), the post-prediction
callback (`PPYoloEPostPredictionCallback`: score threshold, top-k, per-class NMS as torchvision's
`batched_nms`, max predictions) and the mapping of boxes back to the original image.

Importing this module must stay cheap (no torch, no super_gradients): a process that serves only
ONNX models starts in well under a second.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.ml.types import DEFAULT_MAX_BATCH_IMAGES

logger = logging.getLogger(__name__)

# The key of the serving spec (JSON) in the ONNX file's metadata_props.
SPEC_KEY = "sgjobs.serving"
# Bump when the spec's meaning changes: a file of another version is not used (the PyTorch path is).
SPEC_VERSION = 1

# The preprocessing steps we reproduce, by the names `spec_from_processor` gives them.
STEPS = frozenset(
    {"reverse_channels", "longest_max_size_rescale", "rescale", "pad", "standardize", "normalize", "permute"}
)


class ServingFileError(Exception):
    """The serving ONNX file cannot be used (unreadable, no spec, a step we do not reproduce)."""


@dataclass(frozen=True)
class PostProcessing:
    """SG's `PPYoloEPostPredictionCallback` settings other than the per-request thresholds."""

    nms_top_k: int = 1024
    max_predictions: int = 300
    multi_label_per_box: bool = True
    class_agnostic_nms: bool = False


@dataclass(frozen=True)
class ServingSpec:
    """What the serving file's metadata says: the model's classes, input size, preprocessing steps
    (in SG's order) and post-processing settings."""

    class_names: list[str]
    input_size: tuple[int, int]
    steps: list[dict[str, Any]]
    post: PostProcessing

    def to_json(self) -> str:
        """The spec as stored in the ONNX metadata."""
        return json.dumps(
            {
                "version": SPEC_VERSION,
                "class_names": self.class_names,
                "input_size": list(self.input_size),
                "steps": self.steps,
                "post": self.post.__dict__,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ServingSpec:
        """Parse a stored spec; ServingFileError when it is of another version or has unknown steps."""
        data = json.loads(text)
        if data.get("version") != SPEC_VERSION:
            raise ServingFileError(f"serving spec version {data.get('version')!r}, expected {SPEC_VERSION}")
        unknown = [s.get("op") for s in data["steps"] if s.get("op") not in STEPS]
        if unknown:
            raise ServingFileError(f"unsupported preprocessing steps {unknown}")
        height, width = data["input_size"]
        return cls(
            class_names=[str(n) for n in data["class_names"]],
            input_size=(int(height), int(width)),
            steps=list(data["steps"]),
            post=PostProcessing(**data["post"]),
        )


# --- preprocessing -------------------------------------------------------------------------------

# How to undo one step on boxes: ("scale", sy, sx) or ("shift", dy, dx); applied in reverse order.
_Undo = tuple[str, float, float]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    # SG's `_rescale_image`: cv2.INTER_LINEAR.
    return cv2.resize(np.ascontiguousarray(image), dsize=(width, height), interpolation=cv2.INTER_LINEAR)


# The steps that only convert values and layout. A run of them at the end of the steps (SG's
# processors end with standardize and permute) is done in one pass into one float32 buffer: step by
# step, a 640 px input allocated a float64 copy, a float32 copy and a transposed copy (about 4 ms of
# the ORT backend's 6-9 ms over the session alone; 1.5 ms in one pass).
_TAIL_STEPS = frozenset({"standardize", "normalize", "permute"})


def _fused_tail(steps: list[dict[str, Any]]) -> bool:
    """Whether `steps` (the rest of the steps) can be done by `_convert`: only value and layout steps,
    one permute at most, and no normalize after it (its mean and std apply to the last axis)."""
    ops = [step["op"] for step in steps]
    if not set(ops) <= _TAIL_STEPS or ops.count("permute") > 1:
        return False
    return "permute" not in ops or "normalize" not in ops[ops.index("permute") :]


def _convert(pixels: np.ndarray, steps: list[dict[str, Any]]) -> np.ndarray:
    """`pixels` (HWC) through value and layout steps (`_fused_tail`) into one float32 array: the permute
    is a view read once, and each value step runs in place on the output. Bit for bit the step-by-step
    result for uint8 pixels (a float32 division of a uint8 equals the float64 one rounded to float32
    for every value); a standardize after a normalize, which no SG processor writes, may differ from
    it in the last bit (float32 here, float64 there)."""
    permutation = next((tuple(s["permutation"]) for s in steps if s["op"] == "permute"), (0, 1, 2))
    source = pixels.transpose(permutation)
    out = np.empty(source.shape, dtype=np.float32)
    # Where the channel axis is after the permute, for broadcasting normalize's mean and std.
    channels = [1, 1, 1]
    channels[permutation.index(2)] = -1
    current: np.ndarray = source
    for step in steps:
        if step["op"] == "standardize":
            np.divide(current, np.float32(step["max_value"]), out=out, dtype=np.float32)
        elif step["op"] == "normalize":
            mean = np.asarray(step["mean"], dtype=np.float32).reshape(channels)
            std = np.asarray(step["std"], dtype=np.float32).reshape(channels)
            np.subtract(current, mean, out=out, dtype=np.float32)
            np.divide(out, std, out=out)
        else:
            continue
        current = out
    if current is source:  # a permute alone: the values only change type
        np.copyto(out, source, casting="unsafe")
    return out


def _pad(pixels: np.ndarray, top: int, left: int, height: int, width: int, value: Any) -> np.ndarray:
    """`pixels` placed at (top, left) in a (height, width) image filled with `value` (a number, or
    one per channel)."""
    channels = pixels.shape[2]
    fill = [value] * channels if isinstance(value, int | float) else list(value)
    if pixels.dtype == np.uint8 and channels <= 4:
        import cv2

        return cv2.copyMakeBorder(
            np.ascontiguousarray(pixels),
            top,
            height - pixels.shape[0] - top,
            left,
            width - pixels.shape[1] - left,
            cv2.BORDER_CONSTANT,
            value=fill,
        ).reshape(height, width, channels)  # cv2 drops a single channel's axis
    padded = np.empty((height, width, channels), dtype=pixels.dtype)
    padded[...] = np.asarray(fill, dtype=pixels.dtype)
    padded[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    return padded


def preprocess(image: np.ndarray, steps: list[dict[str, Any]]) -> tuple[np.ndarray, list[_Undo]]:
    """`image` (HWC RGB uint8) through `steps` as SG's processings do it; the network input for it
    (CHW float32) and how to map boxes back."""
    undo: list[_Undo] = []
    out: np.ndarray = image
    for index, step in enumerate(steps):
        op = step["op"]
        if op in _TAIL_STEPS and _fused_tail(steps[index:]):
            return _convert(out, steps[index:]), undo
        if op == "reverse_channels":
            out = out[..., ::-1]
        elif op == "longest_max_size_rescale":
            target_h, target_w = step["output_shape"]
            height, width = out.shape[:2]
            scale = min(target_h / height, target_w / width)
            if scale != 1.0:
                out = _resize(out, round(height * scale), round(width * scale))
            undo.append(("scale", scale, scale))
        elif op == "rescale":
            target_h, target_w = step["output_shape"]
            height, width = out.shape[:2]
            out = _resize(out, target_h, target_w)
            undo.append(("scale", target_h / height, target_w / width))
        elif op == "pad":
            target_h, target_w = step["output_shape"]
            pad_h, pad_w = target_h - out.shape[0], target_w - out.shape[1]
            if step["mode"] == "center":
                top, left = pad_h // 2, pad_w // 2
            else:  # bottom_right
                top, left = 0, 0
            out = _pad(out, top, left, target_h, target_w, step["pad_value"])
            undo.append(("shift", float(top), float(left)))
        elif op == "standardize":
            out = (out / float(step["max_value"])).astype(np.float32)
        elif op == "normalize":
            mean = np.asarray(step["mean"], dtype=np.float32).reshape(1, 1, -1)
            std = np.asarray(step["std"], dtype=np.float32).reshape(1, 1, -1)
            out = (out - mean) / std
        elif op == "permute":
            out = np.ascontiguousarray(out.transpose(*step["permutation"]))
        else:  # from_json refuses unknown steps; this is a defect if reached
            raise ServingFileError(f"unsupported preprocessing step {op!r}")
    return np.asarray(out, dtype=np.float32), undo


def _undo_boxes(boxes: np.ndarray, undo: list[_Undo]) -> np.ndarray:
    """Boxes in the network input's pixels back to the original image's, as SG's
    `postprocess_predictions` (in reverse order; float32 like `_rescale_bboxes`)."""
    out = boxes.astype(np.float32, copy=True)
    for kind, a, b in reversed(undo):
        if kind == "shift":
            out[:, [0, 2]] -= b
            out[:, [1, 3]] -= a
        else:
            out *= np.array([[1 / b, 1 / a, 1 / b, 1 / a]], dtype=np.float32)
    return out


# --- post-processing -----------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first, as torchvision's `nms`: a box is dropped when
    its IoU with a kept box is above `iou_threshold`."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        width = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = width * height
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """torchvision's `batched_nms`: NMS per class, by offsetting each class's boxes apart so that
    boxes of different classes never overlap; indices by decreasing score."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = labels.astype(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def decode(
    boxes: np.ndarray, scores: np.ndarray, *, conf: float, iou: float, post: PostProcessing
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's network output (boxes [A, 4], scores [A, C]) to its detections (boxes, scores,
    labels), as `PPYoloEPostPredictionCallback.forward`."""
    boxes = boxes.astype(np.float32, copy=False)
    scores = scores.astype(np.float32, copy=False)
    if post.multi_label_per_box:
        rows, labels = np.nonzero(scores > conf)
        cand_boxes, cand_scores = boxes[rows], scores[rows, labels]
    else:
        labels = scores.argmax(axis=1)
        best = scores[np.arange(len(scores)), labels]
        mask = best >= conf
        cand_boxes, cand_scores, labels = boxes[mask], best[mask], labels[mask]
    if cand_scores.shape[0] > post.nms_top_k:
        top = np.argsort(-cand_scores, kind="stable")[: post.nms_top_k]
        cand_boxes, cand_scores, labels = cand_boxes[top], cand_scores[top], labels[top]
    if post.class_agnostic_nms:
        keep = nms(cand_boxes, cand_scores, iou)
    else:
        keep = batched_nms(cand_boxes, cand_scores, labels, iou)
    keep = keep[: post.max_predictions]
    return cand_boxes[keep], cand_scores[keep], labels[keep].astype(np.int64)


# --- the session ---------------------------------------------------------------------------------


# onnxruntime's execution providers: a name, or a name with its options.
Provider = str | tuple[str, dict[str, str]]

# cuDNN's default (EXHAUSTIVE) search benchmarks every convolution algorithm for each new input
# shape, and the batcher makes a new batch size whenever the number of waiting requests changes:
# on an H200, 4 concurrent clients got 1.6 images/s against 65.5 for one (2026-11-27). The heuristic
# pick costs nothing per shape.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


@functools.cache
def tensorrt_present() -> bool:
    """Whether this onnxruntime's TensorRT provider can run here: its library loads, and TensorRT's
    own libraries with it. onnxruntime-gpu lists the provider whether or not TensorRT is installed,
    and a session asked for it without TensorRT fails and is made again without it."""
    import ctypes

    import onnxruntime

    library = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return False
    return True


def tensorrt_options(path: Path, max_batch: int) -> dict[str, str]:
    """TensorRT's options for the serving file `path`: one optimization profile for batches of 1 to
    `max_batch` images at the file's input size (without one, TensorRT builds an engine, minutes, for
    every new batch size), engines and timings cached per machine across loads."""
    import tempfile

    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    _, channels, height, width = (d.dim_value for d in graph_input.type.tensor_type.shape.dim)
    shape = f"{channels}x{height}x{width}"
    cache = Path(tempfile.gettempdir()) / "sgjobs-tensorrt-cache"
    cache.mkdir(exist_ok=True)
    return {
        "trt_profile_min_shapes": f"{graph_input.name}:1x{shape}",
        "trt_profile_opt_shapes": f"{graph_input.name}:1x{shape}",
        "trt_profile_max_shapes": f"{graph_input.name}:{max_batch}x{shape}",
        "trt_engine_cache_enable": "True",
        "trt_timing_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_path": str(cache),
    }


def providers_for(
    device: str, *, path: Path | None = None, max_batch: int = DEFAULT_MAX_BATCH_IMAGES
) -> list[Provider]:
    """onnxruntime's execution providers for the engine's `device`, best first: on CUDA, TensorRT
    where present (for the serving file `path`; see `tensorrt_options`), then CUDA with
    `CUDA_OPTIONS`, when this onnxruntime has them; always the CPU last."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    chosen: list[Provider] = []
    if device.startswith("cuda"):
        if path is not None and "TensorrtExecutionProvider" in available and tensorrt_present():
            chosen.append(("TensorrtExecutionProvider", tensorrt_options(path, max_batch)))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", CUDA_OPTIONS))
    return [*chosen, "CPUExecutionProvider"]


@dataclass
class OrtModel:
    """A serving ONNX file loaded in onnxruntime, with its spec."""

    session: Any
    spec: ServingSpec
    input_name: str
    path: Path
    # The providers the session really got, best first: onnxruntime drops one whose libraries do
    # not load (a CUDA provider without CUDA's libraries) and says so only in a warning.
    providers: list[str] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH_IMAGES,
    ) -> OrtModel:
        """Open `path` in onnxruntime for batches of up to `max_batch` images; ServingFileError when
        it cannot serve."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # errors only: no warnings per provider on every load
        try:
            providers = providers_for(device, path=path, max_batch=max_batch)
            session = onnxruntime.InferenceSession(str(path), options, providers=providers)
            meta = session.get_modelmeta().custom_metadata_map
        except Exception as exc:  # onnxruntime raises its own types for a bad file
            raise ServingFileError(f"cannot load {path.name}: {exc}") from exc
        if SPEC_KEY not in meta:
            raise ServingFileError(f"{path.name} carries no serving spec")
        spec = ServingSpec.from_json(meta[SPEC_KEY])
        used = list(session.get_providers())
        if device.startswith("cuda") and used == ["CPUExecutionProvider"]:
            logger.warning(
                "serving %s with onnxruntime on the CPU: this onnxruntime has no usable CUDA provider "
                "(install onnxruntime-gpu built for this machine's CUDA)",
                path.name,
            )
        return cls(
            session=session, spec=spec, input_name=session.get_inputs()[0].name, path=path, providers=used
        )

    def predict(
        self, images: list[np.ndarray], *, conf: float, iou: float
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image (HWC RGB uint8): boxes (xyxy, original pixels, not clipped), scores, labels."""
        inputs, undos = [], []
        for image in images:
            tensor, undo = preprocess(image, self.spec.steps)
            inputs.append(tensor)
            undos.append(undo)
        shapes = {t.shape for t in inputs}
        if len(shapes) != 1:  # as SG's pipeline: a batch needs one shape (a resizing step gives it)
            raise ValueError(f"preprocessed images have different shapes {sorted(shapes)}")
        # One image (the usual request) is a view, not a copy of its input.
        batch = inputs[0][None] if len(inputs) == 1 else np.stack(inputs)
        boxes, scores = self.session.run(None, {self.input_name: batch})[:2]
        results = []
        for image_boxes, image_scores, undo in zip(boxes, scores, undos, strict=True):
            kept_boxes, kept_scores, labels = decode(
                image_boxes, image_scores, conf=conf, iou=iou, post=self.spec.post
            )
            results.append((_undo_boxes(kept_boxes, undo), kept_scores, labels))
        return results
