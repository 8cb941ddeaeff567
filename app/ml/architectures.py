"""Which YOLO-NAS a state dict is, from its tensor shapes: one table, derived from super-gradients' models.

YOLO-NAS S, M and L share their key names (S's keys are a subset of M's and L's) and differ in widths.
The table below holds, per architecture, the shapes of a few tensors that tell the three apart: the
first block of the backbone's first and last stages, the first block of the neck, and the first
convolution of the smallest-stride head. `tests/ml/test_architectures.py` builds each model with
super-gradients and checks every entry, and that each model's state dict matches its own row only.

`rbr_reparam` (the re-parameterised 3x3 convolution of SG's QARepVGG blocks) is in every state dict
of these models, trained or fused for deployment, so those keys identify both.

Plain data (no torch): the API and the inference process both read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from app.ml.types import ModelName

# The head's class-prediction conv: its output channels are the number of classes (the seed's recipe
# reads `net["heads.head1.cls_pred.weight"].shape[0]`).
CLS_PRED_KEY = "heads.head1.cls_pred.weight"

ARCHITECTURE_SHAPES: dict[ModelName, dict[str, tuple[int, ...]]] = {
    "yolo_nas_s": {
        "backbone.stage1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (32, 32, 3, 3),
        "backbone.stage4.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (192, 192, 3, 3),
        "neck.neck1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (64, 64, 3, 3),
        "heads.head1.cls_convs.0.seq.conv.weight": (64, 64, 3, 3),
    },
    "yolo_nas_m": {
        "backbone.stage1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (64, 64, 3, 3),
        "backbone.stage4.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (384, 384, 3, 3),
        "neck.neck1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (192, 192, 3, 3),
        "heads.head1.cls_convs.0.seq.conv.weight": (96, 96, 3, 3),
    },
    "yolo_nas_l": {
        "backbone.stage1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (96, 96, 3, 3),
        "backbone.stage4.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (512, 512, 3, 3),
        "neck.neck1.blocks.bottlenecks.0.cv1.rbr_reparam.weight": (128, 128, 3, 3),
        "heads.head1.cls_convs.0.seq.conv.weight": (128, 128, 3, 3),
    },
}


def recognise(shapes: Mapping[str, Sequence[int]]) -> ModelName | None:
    """The architecture whose every table entry `shapes` (key -> tensor shape) matches, or None."""
    for model, expected in ARCHITECTURE_SHAPES.items():
        if all(tuple(shapes.get(key, ())) == shape for key, shape in expected.items()):
            return model
    return None
