"""Fine-tune a YOLO-NAS detector with super-gradients: the seed's recipe behind `run_training`.

Runs in a dedicated per-job subprocess: importing super_gradients replaces stdout/stderr, rewires
root logging and sets a process-global device, which the worker contains by redirecting this
process's output into the job's console log. This module's top level imports no torch or SG (the
worker's training process imports it before training starts); SG and the modules that import it at
their top (`app.ml.callbacks`, `app.ml.sg_logger`, `app.ml.checkpoints`) are imported inside
`run_training` and its helpers, after `prepare_this_process` has set SG's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.params import TrainingConfig
from app.ml.sg_setup import prepare_this_process, setup_device
from app.ml.types import (
    CHECKPOINTS_DIR,
    SG_LOG_DIR,
    Reporter,
    SplitFiles,
    TrainingResult,
    greater_is_better,
)

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

EXPERIMENT_NAME = "train"


def validate_config(config: TrainingConfig) -> None:
    """Raise ValueError for configurations SG would only reject late (or silently mishandle).

    The training parameters were validated with the job spec (`TrainingSpec`); this checks the rest.
    """
    height, width = config.input_size
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"input_size {config.input_size}: both sides must be positive multiples of 32")
    if not config.class_names:
        raise ValueError("class_names is empty")
    if len(set(config.class_names)) != len(config.class_names):
        raise ValueError(f"class_names has duplicates: {config.class_names}")
    for split in (config.train, config.val):
        if not split.annotation_file.is_file():
            raise ValueError(f"annotation file not found: {split.annotation_file}")
        if not split.images_dir.is_dir():
            raise ValueError(f"images folder not found: {split.images_dir}")
    if config.init_checkpoint is not None and not Path(config.init_checkpoint).is_file():
        raise ValueError(f"init checkpoint not found: {config.init_checkpoint}")


def _dataset(split: SplitFiles, config: TrainingConfig, train: bool) -> Any:
    from super_gradients.training.datasets.detection_datasets.coco_format_detection import (
        COCOFormatDetectionDataset,
    )
    from super_gradients.training.transforms.transforms import (
        DetectionHorizontalFlip,
        DetectionHSV,
        DetectionPaddedRescale,
        DetectionRandomAffine,
        DetectionStandardize,
        DetectionTargetsFormatTransform,
    )

    size = tuple(config.input_size)
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
        # Only transforms with get_equivalent_preprocessing(): SG copies the validation set's
        # preprocessing into the model and every checkpoint, which `predict` needs.
        transforms = [
            DetectionPaddedRescale(input_dim=size, max_targets=300),
            DetectionStandardize(max_value=255),
            DetectionTargetsFormatTransform(input_dim=size, output_format="LABEL_CXCYWH"),
        ]
    dataset = COCOFormatDetectionDataset(
        data_dir=str(split.annotation_file.parent),
        json_annotation_file=str(split.annotation_file.resolve()),
        images_dir=str(split.images_dir.resolve()),  # absolute: os.path.join ignores data_dir
        input_dim=size,
        transforms=transforms,
        ignore_empty_annotations=False,
        with_crowd=False,
        # Plain str (not the np.str_ SG derives from the JSON), or checkpoints need numpy globals
        # to load with weights_only=True.
        all_classes_list=[str(name) for name in config.class_names],
    )
    found = [str(name) for name in dataset.original_classes]
    if found != list(config.class_names):
        raise ValueError(
            f"{split.annotation_file}: categories {found} != class_names {list(config.class_names)}"
        )
    return dataset


def _dataloader(dataset: Any, config: TrainingConfig, train: bool) -> DataLoader:
    from super_gradients.training.utils.collate_fn import DetectionCollateFN
    from torch.utils.data import DataLoader

    batch_size = min(config.training.batch_size, len(dataset))
    # A trailing batch of one image gives BatchNorm a one-sample batch (noisy statistics; measured not
    # to raise for YOLO-NAS at 64 px): drop only that batch, never more than one image per epoch.
    drop_last = train and len(dataset) > batch_size and len(dataset) % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=config.num_workers,
        collate_fn=DetectionCollateFN(),
        persistent_workers=False,
    )


def _training_params(config: TrainingConfig, device: str, callback: Any) -> dict[str, Any]:
    from super_gradients.training.losses import PPYoloELoss
    from super_gradients.training.metrics import DetectionMetrics_050
    from super_gradients.training.models.detection_models.pp_yolo_e import PPYoloEPostPredictionCallback

    from app.ml.sg_logger import LOGGER_NAME

    p = config.training
    names = [str(name) for name in config.class_names]
    n = len(names)
    return {
        "warmup_initial_lr": p.warmup_initial_lr,
        "initial_lr": p.initial_lr,
        "lr_mode": p.lr_mode,
        "cosine_final_lr_ratio": p.cosine_final_lr_ratio,
        "optimizer": p.optimizer,
        "zero_weight_decay_on_bias_and_bn": p.zero_weight_decay_on_bias_and_bn,
        "lr_warmup_epochs": p.lr_warmup_epochs,
        "warmup_mode": "LinearEpochLRWarmup",
        "optimizer_params": {"weight_decay": p.weight_decay},
        "ema": p.ema,
        "ema_params": {"beta": p.ema_beta, "decay_type": "exp"},
        "average_best_models": p.average_best_models,
        "max_epochs": p.max_epochs,
        # AMP on CPU is bfloat16 autocast at best; SG's GradScaler path is CUDA-only.
        "mixed_precision": p.mixed_precision and device == "cuda",
        "loss": PPYoloELoss(use_static_assigner=False, num_classes=n, reg_max=16),
        "valid_metrics_list": [
            DetectionMetrics_050(
                score_thres=0.1,
                top_k_predictions=300,
                num_cls=n,
                normalize_targets=True,
                include_classwise_ap=True,
                class_names=names,
                post_prediction_callback=PPYoloEPostPredictionCallback(
                    score_threshold=0.01, nms_top_k=1000, max_predictions=300, nms_threshold=0.7
                ),
            )
        ],
        "metric_to_watch": p.metric_to_watch,
        "greater_metric_to_watch_is_better": greater_is_better(p.metric_to_watch),
        "sg_logger": LOGGER_NAME,
        "sg_logger_params": {
            "tb_files_user_prompt": False,  # True calls input()
            "launch_tensorboard": False,
            "monitor_system": False,
            "save_checkpoints_remote": False,
            "save_tensorboard_remote": False,
            "save_logs_remote": False,
        },
        "phase_callbacks": [callback],
        "save_model": True,
        "seed": p.seed if p.seed is not None else 42,
    }


def _load_model(config: TrainingConfig) -> Any:
    from super_gradients.training import models

    from app.ml.checkpoints import checkpoint_num_classes, sg_safe_globals

    kwargs: dict[str, Any] = {"num_classes": len(config.class_names), "pretrained_weights": None}
    if config.init_checkpoint is not None:
        # models.get replaces the head when the counts differ, but must be told the file's count.
        kwargs["checkpoint_path"] = str(config.init_checkpoint)
        kwargs["checkpoint_num_classes"] = checkpoint_num_classes(config.init_checkpoint)
    with sg_safe_globals():
        return models.get(config.model, **kwargs)


def run_training(config: TrainingConfig, reporter: Reporter) -> TrainingResult:
    """Train `config.model` on `config.train`, validating on `config.val`, reporting to `reporter`.

    Checkpoints go to `<job_dir>/checkpoints/train/RUN_*/` (`app.jobs.files` finds them), SG's logs
    to `<job_dir>/logs` unless SUPER_GRADIENTS_LOG_DIR is set already. Raises TrainingCancelled
    (after the reporter is flushed) when `reporter.should_stop()` turns true; the previous epoch's
    ckpt_latest.pth is then intact. Raises ValueError for device "cuda" without CUDA. Any other
    error propagates unchanged.
    """
    validate_config(config)
    prepare_this_process(config.job_dir / SG_LOG_DIR)
    from super_gradients import Trainer
    from super_gradients.training.utils.utils import random_seed

    from app.ml.callbacks import ReporterCallback
    from app.ml.checkpoints import sg_safe_globals
    from app.ml.sg_logger import reporting_to

    spec = config.training
    try:
        device = setup_device(config.device)
        if spec.seed is not None:
            random_seed(is_ddp=False, device=device, seed=spec.seed)
        train_set = _dataset(config.train, config, train=True)
        val_set = _dataset(config.val, config, train=False)
        train_loader = _dataloader(train_set, config, train=True)
        val_loader = _dataloader(val_set, config, train=False)
        model = _load_model(config)
        callback = ReporterCallback(
            reporter,
            max_epochs=spec.max_epochs,
            metric_to_watch=spec.metric_to_watch,
        )
        trainer = Trainer(
            experiment_name=EXPERIMENT_NAME, ckpt_root_dir=str(config.job_dir / CHECKPOINTS_DIR)
        )
        reporter.event(
            f"training {config.model} on {device}: {len(train_set)} train / "
            f"{len(val_set)} valid images, {len(train_loader)} batches per epoch"
        )
        # average_best_models re-reads its numpy snapshot file every epoch with torch.load.
        with reporting_to(reporter), sg_safe_globals():
            trainer.train(
                model=model,
                training_params=_training_params(config, device, callback),
                train_loader=train_loader,
                valid_loader=val_loader,
            )
    finally:
        # Also on TrainingCancelled and errors: the last points must reach the service.
        reporter.flush()

    return TrainingResult(
        best_metric_name=spec.metric_to_watch,
        best_metric_value=callback.best_value,
        epochs_completed=callback.epochs_validated,
        device=device,
    )
