"""Safe loading of super-gradients checkpoints under torch's `weights_only=True` default.

torch >= 2.6 refuses every global that is not allow-listed. SG's own files need a few numpy
globals (the `averaging_snapshots.pkl` of `average_best_models` stores a numpy metric array), so we
allow exactly those, scoped to a `with` block, instead of the process-wide
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` that would make every load unsafe.

Imports torch at its top (not super-gradients): import it only inside the training or inference
process, never in the API or the worker's main process.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The head's class-prediction conv; its output channels are the number of classes (YOLO-NAS S/M/L).
CLS_PRED_KEY = "heads.head1.cls_pred.weight"


def _numpy_globals() -> list[Any]:
    """The numpy globals SG's `averaging_snapshots.pkl` needs (its float64 `snapshots_metric` array).

    Found by experiment: without any of the four, loading fails. Training checkpoints need none as
    long as class names are plain `str`.
    """
    # numpy 1.x keeps the pickling helpers in numpy.core, 2.x in numpy._core.
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float64DType]


@contextmanager
def sg_safe_globals() -> Iterator[None]:
    """Allow, inside the block only, the numpy globals SG's checkpoints and snapshots contain."""
    with torch.serialization.safe_globals(_numpy_globals()):
        yield


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True` and the scoped SG globals."""
    with sg_safe_globals():
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict but {type(ckpt).__name__}")
    return ckpt


def checkpoint_num_classes(path: Path | str) -> int:
    """Number of classes of the YOLO-NAS head stored in the checkpoint at `path`.

    Accepts SG training checkpoints (`net` key) and bare state dicts; keys may carry a DDP `module.`
    prefix. Raises ValueError when the file holds no YOLO-NAS classification head.
    """
    ckpt = load_checkpoint(path)
    state = ckpt.get("net", ckpt)
    for key, value in state.items():
        if key.endswith(CLS_PRED_KEY) and isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"{path}: no '{CLS_PRED_KEY}' tensor; not a YOLO-NAS checkpoint")
