"""run_training with real super-gradients on the CPU and tiny shapes datasets (about 1.5 minutes)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.jobs import files
from app.ml.params import TrainingConfig
from app.ml.types import IMAGES_PER_SECOND, SplitFiles, TrainingCancelled
from tests.ml.conftest import CLASSES_2, CLASSES_3, RecordingReporter, make_config, run_isolated

pytestmark = pytest.mark.slow  # real super-gradients training on the CPU


def _checkpoints(job_dir: Path) -> dict[str, Path]:
    """The run's checkpoints by artifact key, as the worker records them when a job ends."""
    recorded = files.collect_artifacts(job_dir)
    return {kind: Path(recorded[kind]) for kind in files.CHECKPOINTS if kind in recorded}


def _train_and_predict(config: TrainingConfig) -> dict[str, Any]:
    """Child process: train, then predict one validation image with the best checkpoint."""
    import numpy as np
    from PIL import Image

    from app.ml.checkpoints import sg_safe_globals
    from app.ml.training import run_training

    reporter = RecordingReporter()
    result = run_training(config, reporter)
    checkpoints = _checkpoints(config.job_dir)

    from super_gradients.training import models

    with sg_safe_globals():
        model = models.get(
            config.model,
            num_classes=len(config.class_names),
            checkpoint_path=str(checkpoints[files.CKPT_BEST]),
        )
    image_path = sorted(config.val.images_dir.glob("*.jpg"))[0]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    # No set_dataset_processing_params: the checkpoint must carry class names and preprocessing.
    prediction = model.predict(image, fuse_model=False)
    return {
        "reporter": reporter,
        "result": result,
        "checkpoints": checkpoints,
        "class_names": [str(name) for name in prediction.class_names],
        "boxes_shape": tuple(prediction.prediction.bboxes_xyxy.shape),
    }


def _train_cancelled(config: TrainingConfig, stop_at_check: int) -> dict[str, Any]:
    """Child process: should_stop() turns True at its `stop_at_check`-th call."""
    from app.ml.training import run_training

    reporter = RecordingReporter(stop_when=lambda r: r.checks >= stop_at_check)
    try:
        run_training(config, reporter)
        outcome = "finished"
    except TrainingCancelled as exc:
        outcome = f"cancelled: {exc}"
    reporter.stop_when = None  # lambdas do not pickle back to the parent
    return {"reporter": reporter, "outcome": outcome}


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, shapes3: tuple[SplitFiles, SplitFiles]
) -> Iterator[dict[str, Any]]:
    """One 2-epoch run (16 images, 64 px, batch 8: 2 batches per epoch), shared by the tests below."""
    config = make_config(tmp_path_factory.mktemp("job-main"), shapes3, CLASSES_3)
    yield run_isolated(_train_and_predict, config) | {"config": config}
    shutil.rmtree(config.job_dir, ignore_errors=True)  # ~0.5 GB of checkpoints


def test_reports_epoch_metrics(trained: dict[str, Any]) -> None:
    reporter: RecordingReporter = trained["reporter"]
    assert [p.epoch for p in reporter.series("Valid_mAP@0.50")] == [0, 1]
    for name in ("Train_PPYoloELoss/loss_cls", "Train_PPYoloELoss/loss_iou", "Valid_PPYoloELoss/loss"):
        assert [p.epoch for p in reporter.series(name)] == [0, 1], name
    assert reporter.series("Valid_AP@0.50_triangle")
    assert all(0.0 <= p.value <= 1.0 for p in reporter.series("Valid_mAP@0.50"))


def test_reports_batch_metrics_and_progress(trained: dict[str, Any]) -> None:
    reporter: RecordingReporter = trained["reporter"]
    loss = reporter.series("Batch_PPYoloELoss/loss")
    assert [(p.epoch, p.step) for p in loss] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert all(p.value > 0 for p in loss)
    assert len(reporter.series("Batch_PPYoloELoss/loss_cls")) == 4
    assert len(reporter.series("Batch_LR")) == 4
    throughput = reporter.series(IMAGES_PER_SECOND)
    assert [(p.epoch, p.step) for p in throughput] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert all(0 < p.value < float("inf") for p in throughput)
    assert reporter.progress_calls[-1] == {"epoch": 1, "max_epochs": 2, "batch": 2, "batches_per_epoch": 2}
    assert len(reporter.progress_calls) == 4
    assert reporter.flushes >= 1


def test_result_and_checkpoints(trained: dict[str, Any]) -> None:
    from app.ml.checkpoints import load_checkpoint

    result = trained["result"]
    reporter: RecordingReporter = trained["reporter"]
    assert result.epochs_completed == 2
    assert result.device == "cpu"
    assert result.best_metric_name == "mAP@0.50"
    assert result.best_metric_value == pytest.approx(max(p.value for p in reporter.series("Valid_mAP@0.50")))
    checkpoints = trained["checkpoints"]
    assert set(checkpoints) == {"ckpt_best", "ckpt_latest", "average_model"}
    run_dir = checkpoints["ckpt_latest"].parent
    assert run_dir.name.startswith("RUN_") and run_dir.is_relative_to(trained["config"].job_dir)
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard files still written"
    for path in checkpoints.values():
        ckpt = load_checkpoint(path)  # torch.load(weights_only=True) in the scoped safe globals
        assert ckpt["processing_params"]["class_names"] == list(CLASSES_3)
    assert load_checkpoint(checkpoints["ckpt_latest"])["epoch"] == 2


def test_best_checkpoint_predicts_with_dataset_classes(trained: dict[str, Any]) -> None:
    assert trained["class_names"] == list(CLASSES_3)
    assert trained["boxes_shape"][1:] == (4,)


def test_checkpoint_num_classes(trained: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from app.ml.checkpoints import checkpoint_num_classes

    assert checkpoint_num_classes(trained["checkpoints"]["ckpt_best"]) == 3
    assert checkpoint_num_classes(trained["checkpoints"]["average_model"]) == 3
    bare = tmp_path / "bare.pth"
    torch.save({"module.heads.head1.cls_pred.weight": torch.zeros(5, 8, 1, 1)}, bare)
    assert checkpoint_num_classes(bare) == 5
    torch.save({"net": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a YOLO-NAS"):
        checkpoint_num_classes(tmp_path / "other.pth")


def test_init_from_checkpoint_with_other_class_count(
    trained: dict[str, Any], tmp_path: Path, shapes2: tuple[SplitFiles, SplitFiles]
) -> None:
    from app.ml.checkpoints import checkpoint_num_classes

    init = trained["checkpoints"]["ckpt_best"]  # 3 classes
    # One epoch: a job spec allows no warm-up epoch then (lr_warmup_epochs < max_epochs).
    config = make_config(
        tmp_path / "job",
        shapes2,
        CLASSES_2,
        init_checkpoint=init,
        max_epochs=1,
        lr_warmup_epochs=0,
        batch_size=4,
    )
    out = run_isolated(_train_and_predict, config)
    assert out["result"].epochs_completed == 1
    assert checkpoint_num_classes(out["checkpoints"]["ckpt_latest"]) == 2
    assert out["class_names"] == list(CLASSES_2)
    shutil.rmtree(config.job_dir)


@pytest.mark.parametrize(
    ("stop_at_check", "where"),
    [
        # 2 train batches + 1 validation batch per epoch: check 4 is epoch 1's first train batch,
        # check 6 its validation batch.
        (4, "epoch 1 train batch 0"),
        (6, "epoch 1 validation batch 0"),
    ],
)
def test_cancel_stops_at_next_batch_and_keeps_latest(
    tmp_path: Path, shapes3: tuple[SplitFiles, SplitFiles], stop_at_check: int, where: str
) -> None:
    import torch

    from app.ml.checkpoints import load_checkpoint, sg_safe_globals

    config = make_config(tmp_path / "job", shapes3, CLASSES_3, max_epochs=3)
    out = run_isolated(_train_cancelled, config, stop_at_check)
    reporter: RecordingReporter = out["reporter"]
    assert out["outcome"] == f"cancelled: training cancelled during {where}"
    assert reporter.checks == stop_at_check, "no batch may run after the request"
    assert reporter.flushes >= 1
    assert len(reporter.series("Valid_mAP@0.50")) == 1  # epoch 1 never finished validation

    (latest,) = (tmp_path / "job" / "checkpoints").glob("train/RUN_*/ckpt_latest.pth")
    assert load_checkpoint(latest)["epoch"] == 1
    # average_best_models' snapshot file (left behind on cancel) needs exactly our scoped globals.
    (snapshots,) = latest.parent.glob("averaging_snapshots.pkl")
    with pytest.raises(Exception, match="weights_only"):
        torch.load(snapshots, weights_only=True)
    with sg_safe_globals():
        assert "snapshots_metric" in torch.load(snapshots, weights_only=True)
    shutil.rmtree(config.job_dir)  # the snapshot file alone is ~0.8 GB


def test_rejects_input_size_not_divisible_by_32(
    tmp_path: Path, shapes3: tuple[SplitFiles, SplitFiles]
) -> None:
    from app.ml.training import run_training

    config = make_config(tmp_path / "job", shapes3, CLASSES_3, input_size=(100, 96))
    with pytest.raises(ValueError, match="multiples of 32"):
        run_training(config, RecordingReporter())
