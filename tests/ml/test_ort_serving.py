"""Serving with onnxruntime (`app.ml.ort`) answers as SG's own pipeline does, and the engine picks the
backend per checkpoint and bounds its cache by memory.

SG runs in forked children (`run_isolated`): importing it rewires stdout and logging.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.jobs import files
from app.ml.types import SplitFiles
from tests.ml.conftest import CLASSES_3, RecordingReporter, make_config, run_isolated

pytestmark = pytest.mark.slow  # real super-gradients training and export on the CPU

# Several sizes and aspect ratios, none the input size: every image is rescaled and padded.
SIZES = [(120, 160), (200, 90), (64, 64), (37, 251), (300, 300), (97, 131)]
# The tiny model's scores barely leave its prior (about 0.01) after two epochs.
CONF = 0.005
IOU = 0.5


def _images() -> list[np.ndarray]:
    from tests.prediction.helpers import scene

    return [scene(width, height, seed=i) for i, (height, width) in enumerate(SIZES)]


def _train(config: Any) -> Path:
    """Child process: train; the best checkpoint."""
    from app.ml.training import run_training

    run_training(config, RecordingReporter())
    return Path(files.collect_artifacts(config.job_dir)[files.CKPT_BEST])


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, shapes3: tuple[SplitFiles, SplitFiles]
) -> Iterator[Path]:
    """A tiny trained YOLO-NAS-S (64 x 96 input, not square: both padding directions are used)."""
    config = make_config(tmp_path_factory.mktemp("ort-job"), shapes3, CLASSES_3, input_size=(64, 96))
    yield run_isolated(_train, config)
    shutil.rmtree(config.job_dir, ignore_errors=True)


def _detections(results: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "boxes": np.array([d.box for d in r.detections]).reshape(-1, 4),
            "scores": np.array([d.score for d in r.detections]),
            "labels": np.array([d.class_id for d in r.detections]),
        }
        for r in results
    ]


def _export_and_compare(checkpoint: Path, images: list[np.ndarray]) -> dict[str, Any]:
    """Child process: the PyTorch engine's answers, the serving export, then the ORT engine's."""
    from app.ml.export import export_for_serving
    from app.ml.inference import InferenceEngine, ModelKey
    from app.ml.layout import serving_onnx_path

    key = ModelKey.of("yolo_nas_s", checkpoint)
    torch_engine = InferenceEngine(capacity=2)
    before = torch_engine.predict(key, images, conf=CONF, iou=IOU)
    one_by_one = [torch_engine.predict(key, [image], conf=CONF, iou=IOU).results[0] for image in images]
    exported = export_for_serving("yolo_nas_s", checkpoint, serving_onnx_path(checkpoint))
    again = export_for_serving("yolo_nas_s", checkpoint, serving_onnx_path(checkpoint))
    ort_engine = InferenceEngine(capacity=2)
    after = ort_engine.predict(key, images, conf=CONF, iou=IOU)
    loaded, _ = ort_engine.get(key)
    return {
        "torch_backend": before.backend,
        "ort_backend": after.backend,
        "torch": _detections(one_by_one),
        "torch_batch": _detections(before.results),
        "ort": _detections(after.results),
        "export": exported,
        "again_cached": again.cached,
        "class_names": after.class_names,
        "stats": ort_engine.stats(),
        "nbytes": loaded.nbytes,
    }


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None] - inter)


# The runtimes' floats differ in the last digits: among the weakest detections (scores near CONF, on
# top of near-coincident boxes clipped to the image) NMS may keep one in one runtime and its twin in
# the other. At most one such detection per image may go unmatched; every stronger one must match.
WEAK_SCORE = 0.05


def _assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    if not len(expected["boxes"]) or not len(actual["boxes"]):
        assert len(actual["boxes"]) == len(expected["boxes"])
        return
    # Matched one to one by class, overlap and score, not by order: near-equal scores may swap
    # places, and boxes clipped to the image may coincide.
    from scipy.optimize import linear_sum_assignment

    overlap = _box_iou(expected["boxes"], actual["boxes"])
    same_class = expected["labels"][:, None] == actual["labels"][None]
    score_gap = np.abs(expected["scores"][:, None] - actual["scores"][None])
    rows, cols = linear_sum_assignment(-np.where(same_class, overlap, -1.0) + score_gap)
    assert (same_class[rows, cols]).all()
    assert overlap[rows, cols].min() > 0.99
    np.testing.assert_allclose(actual["scores"][cols], expected["scores"][rows], atol=1e-3)
    unmatched = [*np.delete(expected["scores"], rows), *np.delete(actual["scores"], cols)]
    assert len(unmatched) <= 1 and all(score < WEAK_SCORE for score in unmatched), unmatched


@pytest.fixture(scope="module")
def compared(checkpoint: Path) -> dict[str, Any]:
    return run_isolated(_export_and_compare, checkpoint, _images())


def test_onnxruntime_answers_as_sg_pipeline(compared: dict[str, Any]) -> None:
    assert compared["torch_backend"] == "pytorch" and compared["ort_backend"] == "onnxruntime"
    assert compared["class_names"] == list(CLASSES_3)
    total = 0
    for expected, batch, actual in zip(
        compared["torch"], compared["torch_batch"], compared["ort"], strict=True
    ):
        _assert_same(expected, actual)
        _assert_same(expected, batch)
        total += len(expected["boxes"])
    assert total >= len(SIZES), "too few detections to compare: lower CONF"


def test_serving_export_is_reused_and_describes_itself(compared: dict[str, Any], checkpoint: Path) -> None:
    from app.ml.layout import serving_onnx_path

    export = compared["export"]
    assert export.path == str(serving_onnx_path(checkpoint)) and export.size > 1_000_000
    assert export.input_size == [64, 96] and export.class_names == list(CLASSES_3)
    assert not export.cached and compared["again_cached"]
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]
    [held] = compared["stats"]["cached_models"]
    assert held["backend"] == "onnxruntime" and held["nbytes"] == compared["nbytes"] == export.size


def _engine_backends(checkpoint: Path, stale: Path, copies: list[Path]) -> dict[str, Any]:
    """Child process: the backend the engine picks per file, and what a memory bound evicts."""
    from app.ml.inference import InferenceEngine, ModelKey

    engine = InferenceEngine(capacity=8)
    plain, _ = engine.get(ModelKey.of("yolo_nas_s", checkpoint))
    old, _ = engine.get(ModelKey.of("yolo_nas_s", stale))
    first, _ = engine.get(ModelKey.of("yolo_nas_s", copies[0]))
    # Room for a bit more than one served model: the second evicts the first (and the rest).
    bounded = InferenceEngine(capacity=8, max_bytes=int(first.nbytes * 1.5))
    for path in copies:
        bounded.get(ModelKey.of("yolo_nas_s", path))
    return {
        "plain": plain.backend,
        "stale": old.backend,
        "copy": first.backend,
        "bounded": [m["checkpoint"] for m in bounded.stats()["cached_models"]],
        "loads": bounded.loads,
    }


def test_engine_backend_per_checkpoint_and_memory_bound(
    compared: dict[str, Any], checkpoint: Path, tmp_path: Path
) -> None:
    from app.ml.layout import serving_onnx_path

    serving = serving_onnx_path(checkpoint)
    without = tmp_path / "without" / checkpoint.name
    stale = tmp_path / "stale" / checkpoint.name
    copies = [tmp_path / f"copy{i}" / checkpoint.name for i in range(2)]
    for path in [without, stale, *copies]:
        path.parent.mkdir()
        shutil.copy2(checkpoint, path)
    for path in [stale, *copies]:
        shutil.copy2(serving, serving_onnx_path(path))
    # The checkpoint rewritten after its export: the file is stale, SG serves.
    os.utime(stale, ns=(serving.stat().st_mtime_ns + 10**9, serving.stat().st_mtime_ns + 10**9))
    out = run_isolated(_engine_backends, without, stale, copies)
    assert out == {
        "plain": "pytorch",
        "stale": "pytorch",
        "copy": "onnxruntime",
        "bounded": [str(copies[1])],
        "loads": 2,
    }


def test_serving_needs_neither_torch_nor_super_gradients(compared: dict[str, Any], checkpoint: Path) -> None:
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from pathlib import Path\n"
        "from app.ml.inference import InferenceEngine, ModelKey\n"
        "from tests.prediction.helpers import scene\n"
        "engine = InferenceEngine(capacity=1)\n"
        f"key = ModelKey.of('yolo_nas_s', Path({str(checkpoint)!r}))\n"
        "out = engine.predict(key, [scene(120, 90)], conf=0.01)\n"
        "assert out.backend == 'onnxruntime', out.backend\n"
        "print(sorted(m for m in ('torch', 'super_gradients', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_providers_for_a_cuda_device(
    compared: dict[str, Any],
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a CUDA device asks of onnxruntime, and what a CPU-only onnxruntime (this machine's) gives it."""
    import onnxruntime

    from app.ml.export import SERVING_INPUT
    from app.ml.layout import serving_onnx_path
    from app.ml.ort import OrtModel, providers_for, tensorrt_options, tensorrt_present

    path = serving_onnx_path(checkpoint)
    assert providers_for("cpu", path=path) == ["CPUExecutionProvider"]
    assert providers_for("cuda", path=path) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="app.ml.ort"):
        model = OrtModel.load(path, device="cuda")
    assert model.providers == ["CPUExecutionProvider"]
    assert "no usable CUDA provider" in caplog.text
    # onnxruntime-gpu lists TensorRT whether or not TensorRT's libraries are installed (none here).
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: gpu_build)
    assert not tensorrt_present()
    assert providers_for("cuda", path=path) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    assert providers_for("cpu", path=path) == ["CPUExecutionProvider"]
    height, width = model.spec.input_size
    options = tensorrt_options(path, max_batch=8)
    assert options["trt_profile_min_shapes"] == f"{SERVING_INPUT}:1x3x{height}x{width}"
    assert options["trt_profile_max_shapes"] == f"{SERVING_INPUT}:8x3x{height}x{width}"
    assert Path(options["trt_engine_cache_path"]).is_dir()


def _postprocess_against_sg(seed: int) -> dict[str, Any]:
    """Child process: `app.ml.ort.decode` and `preprocess` against SG's own callback and processing on
    random outputs and images (SG's COCO processing: center padding, which the trained model lacks)."""
    import torch
    from super_gradients.training.models.detection_models.pp_yolo_e.post_prediction_callback import (
        PPYoloEPostPredictionCallback,
    )
    from super_gradients.training.processing.processing import default_yolo_nas_coco_processing_params

    from app.ml.export import serving_spec
    from app.ml.ort import PostProcessing, _undo_boxes, decode, preprocess

    rng = np.random.default_rng(seed)
    anchors, classes = 2100, 5
    xy = rng.uniform(0, 300, (anchors, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (anchors, 2)).astype(np.float32)], axis=1)
    # Clusters of overlapping boxes, as a detector gives around each object.
    boxes[1000:] = boxes[:1100] + rng.normal(0, 3, (1100, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (anchors, classes)).astype(np.float32) ** 4
    mismatches = []
    for multi in (True, False):
        for agnostic in (False, True):
            post = PostProcessing(
                nms_top_k=500, max_predictions=120, multi_label_per_box=multi, class_agnostic_nms=agnostic
            )
            callback = PPYoloEPostPredictionCallback(
                score_threshold=0.2,
                nms_threshold=0.5,
                nms_top_k=post.nms_top_k,
                max_predictions=post.max_predictions,
                multi_label_per_box=multi,
                class_agnostic_nms=agnostic,
            )
            [sg] = callback((torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None]))
            sg = sg.numpy()
            got_boxes, got_scores, got_labels = decode(boxes, scores, conf=0.2, iou=0.5, post=post)
            if not (
                len(sg) == len(got_boxes)
                and np.array_equal(sg[:, :4], got_boxes)
                and np.array_equal(sg[:, 4], got_scores)
                and np.array_equal(sg[:, 5].astype(int), got_labels)
            ):
                mismatches.append((multi, agnostic, len(sg), len(got_boxes)))

    class Stub:  # what `serving_spec` reads of a model
        _image_processor = default_yolo_nas_coco_processing_params()["image_processor"]
        _default_nms_top_k, _default_max_predictions = 1024, 300
        _default_multi_label_per_box, _default_class_agnostic_nms = True, False

    spec = serving_spec(Stub(), ["a"])
    processor = Stub._image_processor
    pre_diff, box_diff = 0.0, 0.0
    for height, width in SIZES + [(640, 640), (1000, 333)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected, metadata = processor.preprocess_image(image.copy())
        got, undo = preprocess(image, spec.steps)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        pre_diff = max(pre_diff, float(np.abs(got - expected).max()))
        from super_gradients.training.utils.predict import DetectionPrediction

        raw = rng.uniform(0, 640, (7, 4)).astype(np.float32)
        prediction = DetectionPrediction(
            bboxes=raw.copy(),
            bbox_format="xyxy",
            confidence=np.ones(7),
            labels=np.zeros(7),
            image_shape=(640, 640),
        )
        back = processor.postprocess_predictions(prediction, metadata).bboxes_xyxy
        box_diff = max(box_diff, float(np.abs(_undo_boxes(raw, undo) - back).max()))
    return {"mismatches": mismatches, "pre_diff": pre_diff, "box_diff": box_diff, "steps": spec.steps}


def test_pre_and_post_processing_match_sg() -> None:
    out = run_isolated(_postprocess_against_sg, 0)
    assert out["mismatches"] == []
    assert [s["op"] for s in out["steps"]] == ["longest_max_size_rescale", "pad", "standardize", "permute"]
    assert out["steps"][1]["mode"] == "center" and out["steps"][1]["pad_value"] == 114
    assert out["pre_diff"] < 1e-6  # float32 rounding of x / 255
    assert out["box_diff"] < 1e-3


def _export_at_limits(checkpoint: Path, output: Path) -> tuple[str, list[int]]:
    """Child process: an export one pixel over `max_pixels` (the refusal's message), then one exactly
    at it (the exported input shape). Neither names an input size: it comes from the checkpoint."""
    from app.ml.export import export_onnx
    from app.ml.types import ExportTooLarge

    pixels = 2 * 64 * 96  # batch 2 of the checkpoint's 64 x 96
    try:
        export_onnx("yolo_nas_s", checkpoint, output, batch_size=2, max_pixels=pixels - 1)
    except ExportTooLarge as exc:
        refused = str(exc)
    else:
        raise AssertionError("an export over max_pixels ran")
    assert not output.exists()
    return refused, export_onnx("yolo_nas_s", checkpoint, output, batch_size=2, max_pixels=pixels).input_shape


def test_an_export_is_refused_over_its_pixel_limit_with_the_checkpoints_input_size(
    checkpoint: Path, tmp_path: Path
) -> None:
    refused, shape = run_isolated(_export_at_limits, checkpoint, tmp_path / "model.onnx")
    assert "2 image(s) of 64x96 is 12,288 pixels" in refused and "12,287" in refused, refused
    assert shape == [2, 3, 64, 96]


def test_an_explicit_input_size_over_the_limit_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    # The checkpoint does not exist: a refusal that came after loading would be a FileNotFoundError
    # (and seconds of SG import), so the ExportTooLarge shows the size was checked first.
    from app.ml.export import export_onnx
    from app.ml.types import ExportTooLarge

    missing, output = tmp_path / "missing.pth", tmp_path / "model.onnx"
    with pytest.raises(ExportTooLarge, match="4 image\\(s\\) of 2048x2048 is 16,777,216 pixels"):
        export_onnx(
            "yolo_nas_s", missing, output, input_size=[2048, 2048], batch_size=4, max_pixels=2**24 - 1
        )
    assert not output.exists()


def test_export_pixels_limit_is_inclusive() -> None:
    from app.ml.types import ExportTooLarge, check_export_pixels
    from app.settings import Settings

    limit = Settings.model_fields["export_max_pixels"].default
    check_export_pixels(32, 640, 640, limit)  # the default lets a batch of 32 at 640 x 640 through
    with pytest.raises(ExportTooLarge, match="33 image\\(s\\) of 640x640 is 13,516,800 pixels"):
        check_export_pixels(33, 640, 640, limit)
