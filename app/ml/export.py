"""ONNX export of a trained checkpoint with SG's `model.export`, preprocessing and NMS included.

Runs in the inference process (`app.ml.model_server`). Two things in SG 3.7.1 need care:
- `export` runs `pip install onnx_graphsurgeon` into the live environment when it is not importable.
  The service must never install anything at run time, so we check the import first and fail
  with a message instead (it is a declared dependency).
- torch >= 2.9 defaults `torch.onnx.export` to `dynamo=True`, which SG's TorchScript-style call
  cannot turn off; we pass `dynamo=False` by wrapping `torch.onnx.export` for the duration of
  the call only (the inference process runs one request at a time).
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
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU


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
) -> ExportResult:
    """Write `output` (an ONNX file taking one uint8 RGB image [1, 3, H, W] at the training input size
    and answering num_detections, boxes, scores, classes), unless it exists and is newer than
    `checkpoint`. Written to a temporary name first, so a reader never sees half a file.
    `class_names`: for a file that carries no processing params (see `load_model`)."""
    if output.is_file() and output.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        dims, dtype, outputs = _describe(output)
        return ExportResult(str(output), output.stat().st_size, True, 0.0, dims, dtype, outputs)
    if importlib.util.find_spec("onnx_graphsurgeon") is None:
        raise ExportError("onnx-graphsurgeon is not installed; install the service's ml dependencies")
    from super_gradients.conversion import ExportTargetBackend

    start = time.perf_counter()
    model, _ = load_model(model_name, checkpoint, device, class_names)
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
                batch_size=1,
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
