"""Plain super-gradients training, the seed's way: the baseline the service is measured against.

Runs in its own process (`python -m bench.plain_sg CONFIG.json RESULT.json`, started by the harness),
so super-gradients' import side effects stay out of the harness. It deliberately uses nothing of
`app/`: COCOFormatDetectionDataset on the dataset's own COCO files, the seed's transforms and
training parameters (the same values the service passes), SG's default `base_sg_logger` and one
`Trainer.train` call. The only addition is `BatchClock`, a callback that appends two clock readings
per training batch (and, for the cancel baseline, sets SG's own `context.stop_training` flag).

Config keys (JSON): data_dir, train_images, train_annotations, val_images, val_annotations,
class_names, model, input_size [h, w], training (the job spec's `training` object), device
(auto|cpu|cuda), ckpt_root, stop_after_batches (optional: set stop_training after this many
training batches).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.time()


def main(argv: list[str] | None = None) -> int:
    """Train once as configured and write the clock readings to the result file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.plain_sg CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    config: dict[str, Any] = json.loads(Path(args[0]).read_text())
    result_path = Path(args[1])
    started = _stamp()
    os.environ.setdefault("CRASH_HANDLER", "FALSE")
    os.environ.setdefault("CONSOLE_LOG_LEVEL", "WARNING")
    os.environ.setdefault("SUPER_GRADIENTS_LOG_DIR", str(Path(config["ckpt_root"]) / "logs"))
    Path(os.environ["SUPER_GRADIENTS_LOG_DIR"]).mkdir(parents=True, exist_ok=True)

    import numpy as np
    import torch
    from super_gradients import Trainer, setup_device
    from super_gradients.common.data_types.enum.multi_gpu_mode import MultiGPUMode
    from super_gradients.training import models
    from super_gradients.training.datasets.detection_datasets.coco_format_detection import (
        COCOFormatDetectionDataset,
    )
    from super_gradients.training.losses import PPYoloELoss
    from super_gradients.training.metrics import DetectionMetrics_050
    from super_gradients.training.models.detection_models.pp_yolo_e import PPYoloEPostPredictionCallback
    from super_gradients.training.transforms.transforms import (
        DetectionHorizontalFlip,
        DetectionHSV,
        DetectionPaddedRescale,
        DetectionRandomAffine,
        DetectionStandardize,
        DetectionTargetsFormatTransform,
    )
    from super_gradients.training.utils.callbacks import Callback, PhaseContext
    from super_gradients.training.utils.collate_fn import DetectionCollateFN
    from torch.utils.data import DataLoader

    imported = _stamp()
    requested = config.get("device", "auto")
    device = "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda":
        setup_device(device="cuda", multi_gpu=MultiGPUMode.OFF, num_gpus=1)
    else:
        setup_device(device="cpu", multi_gpu=MultiGPUMode.OFF, num_gpus=0)

    class BatchClock(Callback):
        """Appends (epoch, batch, perf_counter, wall time) at each training batch end; nothing more."""

        def __init__(self, stop_after: int | None) -> None:
            self.batches: list[tuple[int, int, float, float]] = []
            self.stop_after = stop_after
            self.stop_requested: tuple[float, float] | None = None

        def on_train_batch_end(self, context: PhaseContext) -> None:
            self.batches.append((context.epoch, context.batch_idx, time.perf_counter(), time.time()))
            if self.stop_after is not None and self.stop_requested is None:
                if len(self.batches) >= self.stop_after:
                    # SG's own way to stop (read at the next epoch start, issue #1151).
                    context.update_context(stop_training=True)
                    self.stop_requested = _stamp()

    size = tuple(config["input_size"])
    names = [str(n) for n in config["class_names"]]
    data_dir = Path(config["data_dir"])

    def dataset(images: str, annotations: str, train: bool) -> Any:
        if train:
            transforms = [
                DetectionRandomAffine(
                    degrees=0.0,
                    scales=(0.5, 1.5),
                    shear=0.0,
                    target_size=size,
                    filter_box_candidates=False,
                    border_value=128,
                ),
                DetectionHSV(prob=1.0, hgain=5, vgain=30, sgain=30),
                DetectionHorizontalFlip(prob=0.5),
                DetectionPaddedRescale(input_dim=size),
                DetectionStandardize(max_value=255),
                DetectionTargetsFormatTransform(input_dim=size, output_format="LABEL_CXCYWH"),
            ]
        else:
            transforms = [
                DetectionPaddedRescale(input_dim=size, max_targets=300),
                DetectionStandardize(max_value=255),
                DetectionTargetsFormatTransform(input_dim=size, output_format="LABEL_CXCYWH"),
            ]
        return COCOFormatDetectionDataset(
            data_dir=str(data_dir),
            images_dir=images,
            json_annotation_file=annotations,
            input_dim=size,
            ignore_empty_annotations=False,
            with_crowd=False,
            all_classes_list=names,
            transforms=transforms,
        )

    t = config["training"]
    batch_size = int(t["batch_size"])

    def loader(ds: Any, train: bool) -> DataLoader[Any]:
        # The same DataLoader the service builds: no workers, one-image tail batch dropped.
        bs = min(batch_size, len(ds))
        drop_last = train and len(ds) > bs and len(ds) % bs == 1
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=train,
            drop_last=drop_last,
            num_workers=int(config.get("num_workers", 0)),
            collate_fn=DetectionCollateFN(),
        )

    train_set = dataset(config["train_images"], config["train_annotations"], train=True)
    val_set = dataset(config["val_images"], config["val_annotations"], train=False)
    train_loader = loader(train_set, True)
    val_loader = loader(val_set, False)
    model = models.get(config["model"], num_classes=len(names), pretrained_weights=None)
    clock = BatchClock(config.get("stop_after_batches"))
    metric = str(t.get("metric_to_watch", "mAP@0.50"))
    training_params: dict[str, Any] = {
        "warmup_initial_lr": t.get("warmup_initial_lr", 1e-5),
        "initial_lr": t.get("initial_lr", 5e-4),
        "lr_mode": t.get("lr_mode", "cosine"),
        "cosine_final_lr_ratio": t.get("cosine_final_lr_ratio", 0.5),
        "optimizer": t.get("optimizer", "AdamW"),
        "zero_weight_decay_on_bias_and_bn": True,
        "lr_warmup_epochs": t.get("lr_warmup_epochs", 1),
        "warmup_mode": "LinearEpochLRWarmup",
        "optimizer_params": {"weight_decay": t.get("weight_decay", 1e-4)},
        "ema": t.get("ema", False),
        "average_best_models": t.get("average_best_models", True),
        "ema_params": {"beta": 25, "decay_type": "exp"},
        "max_epochs": int(t["max_epochs"]),
        "mixed_precision": bool(t.get("mixed_precision", True)) and device == "cuda",
        "loss": PPYoloELoss(use_static_assigner=False, num_classes=len(names), reg_max=16),
        "valid_metrics_list": [
            DetectionMetrics_050(
                score_thres=0.1,
                top_k_predictions=300,
                num_cls=len(names),
                normalize_targets=True,
                include_classwise_ap=True,
                class_names=names,
                post_prediction_callback=PPYoloEPostPredictionCallback(
                    score_threshold=0.01, nms_top_k=1000, max_predictions=300, nms_threshold=0.7
                ),
            )
        ],
        "metric_to_watch": metric,
        "greater_metric_to_watch_is_better": "@" in metric,
        # SG's default logger; only the system monitor thread is off, as in the service.
        "sg_logger": "base_sg_logger",
        "sg_logger_params": {"monitor_system": False},
        "phase_callbacks": [clock],
    }
    trainer = Trainer(experiment_name="plain", ckpt_root_dir=str(config["ckpt_root"]))
    # torch >= 2.6 loads with weights_only=True; SG's model-averaging snapshot file needs these numpy
    # globals (the service allows the same four, in the same scoped way).
    try:
        multiarray: Any = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed = [multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float64DType]
    built = _stamp()
    with torch.serialization.safe_globals(allowed):
        trainer.train(
            model=model, training_params=training_params, train_loader=train_loader, valid_loader=val_loader
        )
    returned = _stamp()
    result = {
        "device": device,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "batches_per_epoch": len(train_loader),
        "batch_size": train_loader.batch_size,
        "drop_last": bool(train_loader.drop_last),
        "batches": clock.batches,
        "stop_requested": clock.stop_requested,
        "clock": {"started": started, "imported": imported, "built": built, "returned": returned},
    }
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
