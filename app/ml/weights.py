"""Inspecting a weights file someone brought: is it a YOLO-NAS checkpoint, which one, with which classes.

Runs in the inference process (op `inspect` of `app.ml.model_server`), never in the API process:
inspecting means unpickling. The file is read with torch's `weights_only=True` loader (plus only the
numpy array globals SG's own files contain, `app.ml.checkpoints.sg_safe_globals`), which builds
tensors and plain containers and refuses every other global: a pickle whose `__reduce__` would call
`os.system` is refused before anything runs.

Then the weights (`ema_net`, `net` or the bare dict, as SG picks them) must be a complete YOLO-NAS
state dict: the architecture is recognised from the table in `app.ml.architectures`, and the keys and
shapes are compared with the model super-gradients builds for it, so that SG's order-based fallback
loader (`StrictLoad.NO_KEY_MATCHING`) never pours another network's tensors into a YOLO-NAS.

torch and super-gradients are imported inside functions.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from app.ml.architectures import ARCHITECTURE_SHAPES, CLS_PRED_KEY, recognise
from app.ml.types import CheckpointInfo, ModelName

COCO_NUM_CLASSES = 80


class CheckpointRejected(Exception):
    """The file is not a usable YOLO-NAS checkpoint; the message says why, for the person who sent it."""


def _load(path: Path) -> dict[str, Any]:
    """The file's top-level dict, loaded safely; CheckpointRejected with a readable reason otherwise."""
    import torch

    from app.ml.checkpoints import sg_safe_globals

    try:
        with sg_safe_globals():
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler: a refused global, or a pickle opcode it does not accept.
        message = str(exc)
        found = re.search(r"unsupported GLOBAL (\S+)", message)
        if found:
            raise CheckpointRejected(
                f"the file names the Python object {found.group(1)}, which a checkpoint never needs and "
                "which could run code when loaded: refused (only tensors and plain containers are read)"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", message)
        reason = detail.group(1).strip().splitlines()[0] if detail else "the safe loader refused it"
        raise CheckpointRejected(
            f"the file is not a checkpoint of tensors and plain containers ({reason}): refused"
        ) from None
    except EOFError:
        raise CheckpointRejected("the file is empty or truncated: not a PyTorch checkpoint") from None
    except RuntimeError as exc:
        first = str(exc).split(". ")[0]
        if "zip archive" in first or "central directory" in first:
            raise CheckpointRejected(
                f"the file is truncated or corrupt: not a readable PyTorch checkpoint ({first})"
            ) from None
        raise CheckpointRejected(f"not a readable PyTorch checkpoint: {first}") from None
    except Exception as exc:  # pickle's and torch's many ways of saying "not a pickle/zip"
        raise CheckpointRejected(
            f"not a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointRejected(f"the file holds a {type(ckpt).__name__}, not a checkpoint (a dict)")
    return ckpt


def _state(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    import torch

    from app.ml.checkpoints import model_state

    try:
        layout, state = model_state(ckpt)
    except ValueError as exc:
        raise CheckpointRejected(f"not a YOLO-NAS checkpoint: {exc}") from None
    not_tensors = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointRejected(
            f"'{layout}' is not a state dict: {len(not_tensors)} entries are not tensors "
            f"(first: {str(not_tensors[0])[:100]!r})"
        )
    return layout, state


def _expected_shapes(model: ModelName, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in super-gradients' `model` with `num_classes` classes."""
    from super_gradients.training import models

    net = models.get(model, num_classes=num_classes, pretrained_weights=None)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def _check_complete(model: ModelName, num_classes: int, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = _expected_shapes(model, num_classes)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if wrong:
            key = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (first: {key} {shapes[key]}, expected {expected[key]})"
            )
        raise CheckpointRejected(f"not a complete {model} state dict: {'; '.join(parts)}")


def _class_names(ckpt: dict[str, Any], num_classes: int) -> list[str] | None:
    processing = ckpt.get("processing_params")
    names = processing.get("class_names") if isinstance(processing, dict) else None
    if isinstance(names, list | tuple) and len(names) == num_classes:
        return [str(name) for name in names]
    if num_classes == COCO_NUM_CLASSES:
        # SG's published COCO files carry no names; SG itself gives them COCO's (its processing
        # defaults for pretrained_weights="coco").
        from super_gradients.training.datasets.datasets_conf import COCO_DETECTION_CLASSES_LIST

        return [str(name) for name in COCO_DETECTION_CLASSES_LIST]
    return None


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """What the weights file at `path` is; CheckpointRejected (with the reason) when it is not a
    complete YOLO-NAS S, M or L checkpoint."""
    ckpt = _load(path)
    layout, state = _state(ckpt)
    head = state.get(CLS_PRED_KEY)
    if head is None or head.dim() != 4 or head.shape[0] < 1:
        raise CheckpointRejected(
            f"no '{CLS_PRED_KEY}' tensor in '{layout}': not a YOLO-NAS checkpoint "
            f"({len(state)} tensors, e.g. {', '.join(list(state)[:3]) or 'none'})"
        )
    num_classes = int(head.shape[0])
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    model = recognise(shapes)
    if model is None:
        raise CheckpointRejected(
            "its tensor shapes match none of " + ", ".join(ARCHITECTURE_SHAPES) + ": not a YOLO-NAS S, M or L"
        )
    _check_complete(model, num_classes, shapes)
    return CheckpointInfo(
        model=model,
        num_classes=num_classes,
        class_names=_class_names(ckpt, num_classes),
        layout=layout,
        processing_params=isinstance(ckpt.get("processing_params"), dict),
    )
