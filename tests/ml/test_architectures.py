"""The architecture table (`app.ml.architectures`) against super-gradients' own models, and the
inspection of weights files (`app.ml.weights`) on real SG state dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from app.ml.architectures import ARCHITECTURE_SHAPES, CLS_PRED_KEY, recognise
from app.ml.types import ModelName
from tests.ml.conftest import run_isolated
from tests.weights.standins import CANARY, FIVE_CLASSES


def _sg_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Child process: every tensor's shape of SG's YOLO-NAS S, M and L (80 classes)."""
    from super_gradients.training import models

    shapes = {}
    for model in get_args(ModelName):
        net = models.get(model, num_classes=80, pretrained_weights=None)
        shapes[model] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return shapes


def test_the_table_matches_super_gradients_models() -> None:
    shapes = run_isolated(_sg_shapes)
    assert set(ARCHITECTURE_SHAPES) == set(get_args(ModelName)) == set(shapes)
    for model, expected in ARCHITECTURE_SHAPES.items():
        for key, shape in expected.items():
            assert shapes[model].get(key) == shape, (model, key, shapes[model].get(key))
        # Each model is recognised as itself, and only as itself.
        assert recognise(shapes[model]) == model
        others = [m for m in ARCHITECTURE_SHAPES if m != model]
        assert all(any(shapes[model].get(k) != s for k, s in ARCHITECTURE_SHAPES[o].items()) for o in others)
        assert shapes[model][CLS_PRED_KEY][0] == 80


def test_recognise_needs_every_entry() -> None:
    shapes = dict(ARCHITECTURE_SHAPES["yolo_nas_m"])
    assert recognise(shapes) == "yolo_nas_m"
    shapes.popitem()
    assert recognise(shapes) is None
    assert recognise({}) is None


def _inspect_all(folder: Path) -> dict[str, Any]:
    """Child process: inspect every stand-in; the info or the rejection's message, by file name."""
    from dataclasses import asdict

    from app.ml.weights import CheckpointRejected, inspect_checkpoint

    found: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        try:
            found[path.name] = asdict(inspect_checkpoint(path))
        except CheckpointRejected as exc:
            found[path.name] = str(exc)
    return found


def test_inspection_of_real_checkpoints(standins: Path) -> None:
    found = run_isolated(_inspect_all, standins)
    coco = found["yolo_nas_s_coco.pth"]
    assert coco["model"] == "yolo_nas_s" and coco["num_classes"] == 80 and coco["layout"] == "net"
    assert coco["class_names"][:2] == ["person", "bicycle"] and not coco["processing_params"]
    assert found["s80_ema.pth"]["layout"] == "ema_net" and found["s80_bare.pth"]["layout"] == "state_dict"
    named = found["s5_named.pth"]
    assert named["class_names"] == FIVE_CLASSES and named["processing_params"]
    assert "truncated or corrupt" in found["truncated.pth"]
    assert "not a YOLO-NAS checkpoint" in found["yolox_n.pth"]
    assert "posix.system" in found["evil.pth"] and "posix.system" in found["evil.pkl"]
    assert not (standins / CANARY).exists()
