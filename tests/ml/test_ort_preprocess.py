"""`app.ml.ort.preprocess`: its one-pass tail (value and layout steps into one float32 buffer) gives
what the steps give one at a time, for every arrangement SG's processors can describe (the default
YOLO-NAS steps are also checked against SG itself in test_ort_serving.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.ml.ort import _fused_tail, preprocess

RESCALE = {"op": "longest_max_size_rescale", "output_shape": [64, 64]}
PAD_CENTER = {"op": "pad", "output_shape": [64, 64], "mode": "center", "pad_value": 114}
PAD_CORNER = {"op": "pad", "output_shape": [64, 64], "mode": "bottom_right", "pad_value": [1, 2, 3]}
STANDARDIZE = {"op": "standardize", "max_value": 255.0}
NORMALIZE = {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PERMUTE = {"op": "permute", "permutation": [2, 0, 1]}
REVERSE = {"op": "reverse_channels"}


TAIL_OPS = ("standardize", "normalize", "permute")


def _split(steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The geometric steps, and the value and layout steps after them."""
    first = next(i for i, step in enumerate(steps) if step["op"] in TAIL_OPS)
    return steps[:first], steps[first:]


def _one_at_a_time(image: np.ndarray, steps: list[dict[str, Any]]) -> np.ndarray:
    """The value and layout steps as SG writes them (`training/processing/processing.py`), each on
    the previous one's whole array, after the geometric ones."""
    geometric, tail = _split(steps)
    out: np.ndarray = preprocess(image, geometric)[0].astype(np.uint8)
    for step in tail:
        if step["op"] == "standardize":
            out = (out / float(step["max_value"])).astype(np.float32)
        elif step["op"] == "normalize":
            mean = np.asarray(step["mean"], dtype=np.float32).reshape(1, 1, -1)
            std = np.asarray(step["std"], dtype=np.float32).reshape(1, 1, -1)
            out = (out - mean) / std
        else:
            out = np.ascontiguousarray(out.transpose(*step["permutation"]))
    return np.asarray(out, dtype=np.float32)


STEP_LISTS = {
    "yolo-nas default": [RESCALE, PAD_CENTER, STANDARDIZE, PERMUTE],
    "normalized": [REVERSE, RESCALE, PAD_CORNER, STANDARDIZE, NORMALIZE, PERMUTE],
    "permute first": [RESCALE, PAD_CENTER, PERMUTE, STANDARDIZE],
    "no permute": [RESCALE, PAD_CENTER, STANDARDIZE],
    "permute only": [RESCALE, PAD_CENTER, PERMUTE],
    "normalize without standardize": [RESCALE, PAD_CENTER, NORMALIZE, PERMUTE],
}


@pytest.mark.parametrize("steps", STEP_LISTS.values(), ids=STEP_LISTS.keys())
@pytest.mark.parametrize("shape", [(48, 64), (64, 64), (100, 37), (5, 300)])
def test_the_one_pass_tail_equals_the_steps_one_at_a_time(
    steps: list[dict[str, Any]], shape: tuple[int, int]
) -> None:
    assert _fused_tail(_split(steps)[1])  # the one-pass path, not the step-by-step one
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got, _ = preprocess(image, steps)
    expected = _one_at_a_time(image, steps)
    assert got.dtype == np.float32 and got.shape == expected.shape and got.flags.c_contiguous
    assert np.array_equal(got, expected)


def test_a_tail_it_cannot_fuse_goes_step_by_step() -> None:
    # normalize after permute broadcasts its mean over the last axis, as the step-by-step path does.
    steps = [RESCALE, PAD_CENTER, STANDARDIZE, PERMUTE, {**NORMALIZE, "mean": [0.5] * 64, "std": [0.25] * 64}]
    assert not _fused_tail(steps[2:])
    image = np.random.default_rng(1).integers(0, 256, (30, 64, 3), dtype=np.uint8)
    got, _ = preprocess(image, steps)
    expected = (
        np.ascontiguousarray((image_padded(image) / 255.0).astype(np.float32).transpose(2, 0, 1)) - 0.5
    ) / 0.25
    assert np.array_equal(got, expected.astype(np.float32))


def image_padded(image: np.ndarray) -> np.ndarray:
    """`image` (30x64) centre-padded to 64x64 with 114, as PAD_CENTER."""
    padded = np.full((64, 64, 3), 114, dtype=np.uint8)
    top = (64 - image.shape[0]) // 2
    padded[top : top + image.shape[0]] = image
    return padded


def test_a_single_channel_image_pads_and_converts() -> None:
    image = np.random.default_rng(2).integers(0, 256, (40, 64, 1), dtype=np.uint8)
    got, undo = preprocess(image, [PAD_CENTER, STANDARDIZE, PERMUTE])
    assert got.shape == (1, 64, 64)
    assert np.array_equal(got[0, 12:52], (image[..., 0] / 255.0).astype(np.float32))
    assert (got[0, :12] == np.float32(114 / 255.0)).all() and undo == [("shift", 12.0, 0.0)]
