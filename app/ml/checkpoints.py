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

from app.ml.architectures import CLS_PRED_KEY

MODULE_PREFIX = "module."


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


def model_state(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The weights super-gradients loads from a checkpoint dict, and where they were: `ema_net` when
    the file has one (`models.get(checkpoint_path=...)` prefers it), else `net`, else the dict itself
    (a bare state dict). A DDP `module.` prefix on every key is dropped, as SG drops it."""
    layout = "ema_net" if "ema_net" in ckpt else "net" if "net" in ckpt else "state_dict"
    state = ckpt[layout] if layout != "state_dict" else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"'{layout}' holds a {type(state).__name__}, not a state dict")
    if state and all(isinstance(k, str) and k.startswith(MODULE_PREFIX) for k in state):
        state = {k[len(MODULE_PREFIX) :]: v for k, v in state.items()}
    return layout, state


def checkpoint_num_classes(path: Path | str) -> int:
    """Number of classes of the YOLO-NAS head stored in the checkpoint at `path`.

    Accepts SG training checkpoints (`net`, `ema_net`) and bare state dicts; keys may carry a DDP
    `module.` prefix. Raises ValueError when the file holds no YOLO-NAS classification head.
    """
    _, state = model_state(load_checkpoint(path))
    value = state.get(CLS_PRED_KEY)
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return int(value.shape[0])
    raise ValueError(f"{path}: no '{CLS_PRED_KEY}' tensor; not a YOLO-NAS checkpoint")


# PROVISIONAL (replaced by the ml branch): the newest loadable ckpt_latest.pth of this job.
from dataclasses import dataclass, field  # noqa: E402


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    next_epoch: int
    best_value: float | None = None
    skipped: list[str] = field(default_factory=list)


def pick_resume_checkpoint(job_dir: Path) -> ResumePoint | None:
    found = sorted((job_dir / "checkpoints").rglob("ckpt_latest.pth"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
        except Exception:
            continue
        return ResumePoint(path=path, next_epoch=int(ckpt["epoch"]) + 1)
    return None
