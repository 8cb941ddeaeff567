"""ONNX export of a trained checkpoint: for download with SG's `model.export` (preprocessing and NMS
included), and for serving (`export_for_serving`: the network alone, dynamic batch, served by
`app.ml.ort`).

Runs in the inference process (`app.ml.model_server`) or the worker. Two things in SG 3.7.1 need care:
- `export` runs `pip install onnx_graphsurgeon` into the live environment when it is not importable.
  The service must never install anything at run time, so we check the import first and fail
  with a message instead (it is a declared dependency).
- torch >= 2.9 defaults `torch.onnx.export` to `dynamo=True`, which SG's TorchScript-style call
  cannot turn off; we pass `dynamo=False` by wrapping `torch.onnx.export` for the duration of
  the call only (exports run one at a time, on the inference process's one export thread, and
  nothing else there calls `torch.onnx.export`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.inference import load_model
from app.ml.layout import BEST_CHECKPOINT, run_dirs, serving_onnx_path, temp_path
from app.ml.ort import SPEC_KEY, PostProcessing, ServingSpec
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU, check_export_pixels


class ExportError(Exception):
    """The model cannot be exported (a missing dependency, or SG failed)."""


@dataclass
class ExportResult:
    """Where the ONNX file is and what it expects."""

    path: str
    size: int
    cached: bool
    seconds: float
    input_shape: list[int]
    input_dtype: str
    outputs: list[str]


@contextmanager
def _torchscript_onnx_export() -> Iterator[None]:
    """Within the block, `torch.onnx.export` defaults to the TorchScript exporter (dynamo=False)."""
    import torch.onnx

    original = torch.onnx.export
    if "dynamo" not in inspect.signature(original).parameters:  # older torch: nothing to change
        yield
        return

    @functools.wraps(original)
    def export(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


def _check_inferred_size(model: Any, batch_size: int, limit: int) -> None:
    """`check_export_pixels` for an export at the input size SG takes from the model's processing
    params (an explicit `input_size` is checked before the model is loaded)."""
    from super_gradients.training.utils.export_utils import infer_image_shape_from_model

    shape = infer_image_shape_from_model(model)
    if shape is None:
        return  # SG refuses an export without a shape itself
    check_export_pixels(batch_size, shape[0], shape[1], limit)


def _describe(path: Path) -> tuple[list[int], str, list[str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph_input = model.graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type).name
    return dims, dtype, [o.name for o in model.graph.output]


def export_onnx(
    model_name: str,
    checkpoint: Path,
    output: Path,
    *,
    conf: float = DEFAULT_CONF,
    iou: float = DEFAULT_IOU,
    device: str = "cpu",
    class_names: list[str] | None = None,
    input_size: tuple[int, int] | list[int] | None = None,
    batch_size: int = 1,
    fp16: bool = False,
    max_pixels: int | None = None,
) -> ExportResult:
    """Write `output` (an ONNX file taking uint8 RGB images [batch_size, 3, H, W], H x W the training
    input size unless `input_size` says otherwise, and answering num_detections, boxes, scores,
    classes), unless it exists and is newer than `checkpoint`. Written to a temporary name first, so
    a reader never sees half a file. `class_names`: for a file that carries no processing params
    (see `load_model`). `fp16`: half-precision weights, only on a CUDA `device` (ExportError else:
    SG converts the model with `.half()` and traces it on the export device). `max_pixels`: the most
    batch_size x H x W allowed (ExportTooLarge beyond: tracing runs the model on a batch that size);
    an explicit `input_size` is checked before the model is loaded."""
    if fp16 and not device.startswith("cuda"):
        raise ExportError("an fp16 export needs a CUDA device; this inference process runs on the CPU")
    if max_pixels is not None and input_size is not None:  # refused before seconds of loading
        check_export_pixels(batch_size, input_size[0], input_size[1], max_pixels)
    if output.is_file() and output.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        dims, dtype, outputs = _describe(output)
        return ExportResult(str(output), output.stat().st_size, True, 0.0, dims, dtype, outputs)
    if importlib.util.find_spec("onnx_graphsurgeon") is None:
        raise ExportError("onnx-graphsurgeon is not installed; install the service's ml dependencies")
    from super_gradients.conversion import ExportQuantizationMode, ExportTargetBackend

    start = time.perf_counter()
    model, _ = load_model(model_name, checkpoint, device, class_names)
    if max_pixels is not None and input_size is None:
        _check_inferred_size(model, batch_size, max_pixels)
    output.parent.mkdir(parents=True, exist_ok=True)
    # SG infers the format from the extension: keep ".onnx" last.
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    try:
        with _torchscript_onnx_export():
            model.export(
                str(tmp),
                engine=ExportTargetBackend.ONNXRUNTIME,
                confidence_threshold=conf,
                nms_threshold=iou,
                preprocessing=True,
                postprocessing=True,
                batch_size=batch_size,
                input_image_shape=tuple(input_size) if input_size is not None else None,
                quantization_mode=ExportQuantizationMode.FP16 if fp16 else None,
                device=device if fp16 else None,
                onnx_simplify=True,
            )
        os.replace(tmp, output)
    except Exception as exc:
        raise ExportError(f"export failed: {exc.__class__.__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dims, dtype, outputs = _describe(output)
    return ExportResult(
        path=str(output),
        size=output.stat().st_size,
        cached=False,
        seconds=time.perf_counter() - start,
        input_shape=dims,
        input_dtype=dtype,
        outputs=outputs,
    )


# --- for serving ---------------------------------------------------------------------------------

SERVING_INPUT = "images"
SERVING_OUTPUTS = ("boxes", "scores")
SERVING_OPSET = 17


@dataclass
class ServingExport:
    """The serving ONNX file of a checkpoint (see `export_for_serving`)."""

    path: str
    size: int
    cached: bool
    seconds: float
    input_size: list[int]
    class_names: list[str]


def serving_spec(model: Any, class_names: list[str]) -> ServingSpec:
    """What `app.ml.ort` needs to reproduce `model`'s SG pipeline around the bare network: its image
    processor as plain steps and its post-prediction settings. ExportError for a processor with a
    step `app.ml.ort` does not reproduce (such a model is served by the PyTorch path)."""
    from super_gradients.training.processing.processing import (
        ComposeProcessing,
        DetectionBottomRightPadding,
        DetectionCenterPadding,
        DetectionLongestMaxSizeRescale,
        DetectionRescale,
        ImagePermute,
        NormalizeImage,
        ReverseImageChannels,
        StandardizeImage,
    )

    processor = model._image_processor
    processings = processor.processings if type(processor) is ComposeProcessing else [processor]
    steps: list[dict[str, Any]] = []
    for p in processings:
        # Exact types: a subclass may do something else than the step we reproduce.
        kind = type(p)
        if kind is ReverseImageChannels:
            steps.append({"op": "reverse_channels"})
        elif kind is DetectionLongestMaxSizeRescale:
            steps.append({"op": "longest_max_size_rescale", "output_shape": [int(v) for v in p.output_shape]})
        elif kind is DetectionRescale:
            steps.append({"op": "rescale", "output_shape": [int(v) for v in p.output_shape]})
        elif kind in (DetectionCenterPadding, DetectionBottomRightPadding):
            value = p.pad_value
            steps.append(
                {
                    "op": "pad",
                    "mode": "center" if kind is DetectionCenterPadding else "bottom_right",
                    "output_shape": [int(v) for v in p.output_shape],
                    "pad_value": value if isinstance(value, int | float) else [float(v) for v in value],
                }
            )
        elif kind is StandardizeImage:
            steps.append({"op": "standardize", "max_value": float(p.max_value)})
        elif kind is NormalizeImage:
            steps.append({"op": "normalize", "mean": p.mean.ravel().tolist(), "std": p.std.ravel().tolist()})
        elif kind is ImagePermute:
            steps.append({"op": "permute", "permutation": [int(v) for v in p.permutation]})
        else:
            raise ExportError(f"preprocessing step {kind.__name__} is not reproduced for serving")
    shape = processor.infer_image_input_shape()
    if shape is None:
        raise ExportError("the preprocessing gives no fixed input size")
    return ServingSpec(
        class_names=list(class_names),
        input_size=(int(shape[0]), int(shape[1])),
        steps=steps,
        post=PostProcessing(
            nms_top_k=int(model._default_nms_top_k),
            max_predictions=int(model._default_max_predictions),
            multi_label_per_box=bool(model._default_multi_label_per_box),
            class_agnostic_nms=bool(model._default_class_agnostic_nms),
        ),
    )


def export_for_serving(
    model_name: str,
    checkpoint: Path,
    output: Path,
    class_names: list[str] | None = None,
) -> ServingExport:
    """Write `output`, the ONNX file the inference engine serves `checkpoint` from (put it at
    `app.ml.layout.serving_onnx_path(checkpoint)` for the engine to find it), unless it exists and is
    at least as new as `checkpoint`.

    The file holds the network only (no preprocessing, no NMS) with a dynamic batch axis: float32
    `images` [N, 3, H, W] in, `boxes` [N, A, 4] (xyxy in input pixels) and `scores` [N, A, C] out,
    so one file serves any thresholds and batch size. Its metadata (`app.ml.ort.SPEC_KEY`) carries
    the class names, the input size, the checkpoint's SG preprocessing and the post-processing
    settings. Written under a temporary name and renamed into place. `class_names`: for a file that
    carries no processing params (see `load_model`). Runs on the CPU (the serving process picks its
    own execution provider). Raises ModelLoadError for a checkpoint that does not load and
    ExportError when the model cannot be exported for serving."""
    if output.is_file() and output.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        spec = _serving_spec_of(output)
        return ServingExport(
            str(output), output.stat().st_size, True, 0.0, list(spec.input_size), spec.class_names
        )
    import onnx
    import torch

    start = time.perf_counter()
    model, names = load_model(model_name, checkpoint, "cpu", class_names)
    spec = serving_spec(model, names)
    height, width = spec.input_size
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(output)
    try:
        # What SG's pipeline does to its fused copy before the first call: RepVGG branches fused,
        # anchors cached for the input size.
        model.prep_model_for_conversion(input_size=(height, width))
        with torch.no_grad():
            torch.onnx.export(
                model,
                (torch.zeros(1, 3, height, width),),
                str(tmp),
                input_names=[SERVING_INPUT],
                output_names=list(SERVING_OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in (SERVING_INPUT, *SERVING_OUTPUTS)},
                opset_version=SERVING_OPSET,
                dynamo=False,  # see the module docstring
            )
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, {SPEC_KEY: spec.to_json()})
        onnx.save(graph, str(tmp))
        os.replace(tmp, output)
    except Exception as exc:
        raise ExportError(f"serving export failed: {exc.__class__.__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return ServingExport(
        path=str(output),
        size=output.stat().st_size,
        cached=False,
        seconds=time.perf_counter() - start,
        input_size=[height, width],
        class_names=spec.class_names,
    )


def _serving_spec_of(path: Path) -> ServingSpec:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    if SPEC_KEY not in props:
        raise ExportError(f"{path.name} carries no serving spec")
    return ServingSpec.from_json(props[SPEC_KEY])


def best_checkpoint_of(job_dir: Path) -> Path | None:
    """The newest `ckpt_best.pth` among the job's run directories (the one /predict serves)."""
    found = [
        run_dir / BEST_CHECKPOINT for run_dir in run_dirs(job_dir) if (run_dir / BEST_CHECKPOINT).is_file()
    ]
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)


def export_job_for_serving(model_name: str, job_dir: Path) -> ServingExport | None:
    """Export a finished training's best checkpoint for serving, next to it
    (`layout.serving_onnx_path`); None when the run left no best checkpoint. Raises as
    `export_for_serving` does."""
    checkpoint = best_checkpoint_of(job_dir)
    if checkpoint is None:
        return None
    return export_for_serving(model_name, checkpoint, serving_onnx_path(checkpoint))
