"""Fine-tune a YOLO-NAS detector with super-gradients: the seed's recipe behind `run_training`.

Runs in a dedicated per-job subprocess: importing super_gradients replaces stdout/stderr, rewires
root logging and sets a process-global device, which the worker contains by redirecting this
process's output into the job's console log. This module's top level imports no torch or SG (the
worker's training process imports it before training starts); SG and the modules that import it at
their top (`app.ml.callbacks`, `app.ml.sg_logger`, `app.ml.checkpoints`) are imported inside
`run_training` and its helpers, after `prepare_this_process` has set SG's environment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from app.ml.layout import BEST_CHECKPOINT, EXPERIMENT_NAME, is_temp_file, run_dirs
from app.ml.params import TrainingConfig, TrainingSpec
from app.ml.sg_setup import prepare_this_process, remember_arch_params, setup_device
from app.ml.types import (
    CHECKPOINTS_DIR,
    SG_LOG_DIR,
    ModelName,
    Reporter,
    SplitFiles,
    TrainingResult,
    greater_is_better,
)
from app.paths import real

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from app.ml.checkpoints import ResumePoint


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
    if config.resume_from is not None:
        if not Path(config.resume_from).is_file():
            raise ValueError(f"resume checkpoint not found: {config.resume_from}")
    elif config.init_checkpoint is not None and not Path(config.init_checkpoint).is_file():
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


def _seed(spec: TrainingSpec) -> int:
    """The run's seed: the spec's, else SG's default (42). Every rank must use the same."""
    return spec.seed if spec.seed is not None else 42


def _dataloader(dataset: Any, config: TrainingConfig, train: bool) -> DataLoader:
    from super_gradients.training.utils.collate_fn import DetectionCollateFN
    from torch.utils.data import DataLoader

    sampler: Any = None
    images = len(dataset)
    if config.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        # Each rank its share of every epoch (reshuffled per epoch by SG's set_epoch); a share is
        # padded with repeats up to the same size on every rank, as DDP needs.
        sampler = DistributedSampler(dataset, shuffle=train, seed=_seed(config.training))
        images = len(sampler)
    batch_size = min(config.training.batch_size, images)
    # A trailing batch of one image gives BatchNorm a one-sample batch (noisy statistics; measured not
    # to raise for YOLO-NAS at 64 px): drop only that batch, never more than one image per epoch.
    drop_last = train and images > batch_size and images % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=config.num_workers,
        collate_fn=DetectionCollateFN(),
        persistent_workers=False,
    )


def _run_dir_of(job_dir: Path, checkpoint: Path) -> Path | None:
    """The job's run directory `checkpoint` lies in (symlinks followed), else None."""
    parent = real(checkpoint).parent
    return next((d for d in run_dirs(job_dir) if real(d) == parent), None)


def _resume_params(config: TrainingConfig) -> dict[str, Any]:
    """SG's resume settings for `config.resume_from`: load that file (`resume_path`) and, when it lies
    in one of this job's run directories, keep writing there (`run_id`), where SG finds the
    averaging snapshots of the earlier attempt. Without `run_id` SG would start a new run directory."""
    if config.resume_from is None:
        return {}
    path = Path(config.resume_from)
    params: dict[str, Any] = {"resume_path": str(path)}
    run_dir = _run_dir_of(config.job_dir, path)
    if run_dir is not None:
        params["run_id"] = run_dir.name
    return params


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
        "seed": _seed(p),
        **_resume_params(config),
    }


def _trainer(job_dir: Path, resumed: ResumePoint | None) -> Any:
    """A Trainer with SG 3.7.1's resume and averaging bugs worked around (see `ResumingTrainer`);
    `resumed`: the checkpoint `config.resume_from` as `_start_resume` read it."""
    from super_gradients import Trainer

    from app.ml.sg_logger import AtomicModelWeightAveraging, wait_for_checkpoints

    class ResumingTrainer(Trainer):
        """SG's Trainer, five methods wrapped (no SG source changed):

        - `_load_checkpoint_to_model`: SG loads the checkpoint before `train()` sets
          `metric_to_watch`, so it never matches the checkpoint's tracked metric; SG then keeps
          best_metric at +inf (ckpt_best.pth never updates again for a higher-is-better metric, and
          the first epoch after the resume always overwrites it for a loss) and validates the
          resumed model once more before training. Here the best so far comes from the resume
          point (`app.ml.checkpoints.read_resume_point`) and that extra validation is skipped.
        - `_init_monitored_items`: builds `AtomicModelWeightAveraging` instead of SG's averaging.
        - `_save_checkpoint`: tells the averaging which epoch count it is saving.
        - `_validate_final_average_model`: SG reads average_model.pth back from disk; it waits for
          the file to be in place (checkpoints are put in place in the background).
        - `_net_to_device`: data-parallel on the CPU (`app.ml.distributed`), which SG's DDP lacks.
        """

        def _load_checkpoint_to_model(self) -> None:
            super()._load_checkpoint_to_model()
            if not self.load_checkpoint:
                return
            # train() sets both only after this; the averaging and _reset_best_metric need them.
            self.metric_to_watch = self.training_params.metric_to_watch
            self.greater_metric_to_watch_is_better = self.training_params.greater_metric_to_watch_is_better
            if resumed is not None and resumed.best_value is not None:
                self.best_metric = resumed.best_value
                # What SG records as the best so far in the next checkpoints (its metrics hold no
                # loss values; this one holds the watched value, whichever it is).
                self._best_ckpt_metrics = {
                    "tracked_metric_name": self.metric_to_watch,
                    "valid": {self.metric_to_watch: resumed.best_value},
                }
                self._eval_before_resume = False
            else:
                # No best recorded for this metric: SG validates the resumed model before training
                # and that becomes the best; start from the worst value, not SG's +inf.
                self._reset_best_metric()
                self._eval_before_resume = True

        def _init_monitored_items(self) -> None:
            wanted = self.training_params.average_best_models
            # SG builds its ModelWeightAveraging here when the flag is set; build ours instead.
            self.training_params.average_best_models = False
            try:
                super()._init_monitored_items()
            finally:
                self.training_params.average_best_models = wanted
            if wanted:
                self.model_weight_averaging = AtomicModelWeightAveraging(
                    ckpt_dir=self.checkpoints_dir_path,
                    greater_is_better=self.greater_metric_to_watch_is_better,
                    metric_to_watch=self.metric_to_watch,
                    load_checkpoint=self.load_checkpoint,
                    resume_epoch=self.start_epoch if self.load_checkpoint else None,
                )

        def _net_to_device(self) -> None:
            from super_gradients.common.data_types.enum.multi_gpu_mode import MultiGPUMode
            from super_gradients.common.environment.device_utils import device_config

            if device_config.multi_gpu != MultiGPUMode.DISTRIBUTED_DATA_PARALLEL or device_config.is_cuda:
                super()._net_to_device()
                return
            # SG wraps its DDP model with a GPU index per rank; the CPU ranks (gloo) have none.
            import torch

            net: Any = getattr(self, "net")  # noqa: B009 (SG leaves the attribute untyped)
            net.to("cpu")
            self.net = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)

        def _save_checkpoint(
            self, optimizer: Any = None, epoch: int | None = None, *args: Any, **kwargs: Any
        ) -> None:
            if isinstance(self.model_weight_averaging, AtomicModelWeightAveraging):
                self.model_weight_averaging.epoch = epoch
            super()._save_checkpoint(optimizer, epoch, *args, **kwargs)

        def _validate_final_average_model(self, *args: Any, **kwargs: Any) -> None:
            wait_for_checkpoints()
            super()._validate_final_average_model(*args, **kwargs)

    return ResumingTrainer(experiment_name=EXPERIMENT_NAME, ckpt_root_dir=str(job_dir / CHECKPOINTS_DIR))


def _start_resume(config: TrainingConfig, reporter: Reporter) -> ResumePoint | None:
    """Read `config.resume_from` (cheaply; it was verified when picked), check it fits the config,
    and delete the temporary files a killed attempt left in the run directory it continues."""
    if config.resume_from is None:
        return None
    from app.ml.checkpoints import read_resume_point

    path = Path(config.resume_from)
    point = read_resume_point(path, verify=False)
    spec = config.training
    if point.next_epoch > spec.max_epochs:
        raise ValueError(
            f"{path.name} has {point.next_epoch} epochs done, more than max_epochs {spec.max_epochs}"
        )
    if point.metric is not None and point.metric != spec.metric_to_watch:
        reporter.event(
            f"{path.name} watched {point.metric}, this run watches {spec.metric_to_watch}: best value reset",
            level="warning",
        )
        point = dataclasses.replace(point, best_value=None, metric=None)
    if point.best_value is not None and not any(
        (d / BEST_CHECKPOINT).is_file() for d in run_dirs(config.job_dir)
    ):
        # The attempt that wrote the best epoch died before its ckpt_best.pth reached this machine
        # (another machine's, killed between its two uploads). Keeping the recorded best would mean
        # no later epoch that fails to beat it ever writes one, and the job would end with no model
        # to serve: SG validates the resumed model instead, and that becomes the best so far.
        reporter.event(
            f"no {BEST_CHECKPOINT} of the best epoch survived: the resumed model is validated and "
            "becomes the best so far",
            level="warning",
        )
        point = dataclasses.replace(point, best_value=None, metric=None)
    run_dir = _run_dir_of(config.job_dir, path)
    if run_dir is not None and _is_main_rank():
        # Only this attempt writes there now; a stale process that still writes is fenced by the
        # lease check before its rename, and loses its temporary file here.
        for stale in run_dir.iterdir():
            if is_temp_file(stale):
                stale.unlink(missing_ok=True)
    best = "none" if point.best_value is None else f"{point.best_value:.4f}"
    reporter.event(
        f"resuming from {path.name}: {point.next_epoch} epochs done, next epoch {point.next_epoch + 1}/"
        f"{spec.max_epochs}, best {spec.metric_to_watch} so far {best}"
    )
    return point


def _is_main_rank() -> bool:
    """Rank 0 of a data-parallel job, or a training on one device: the one that writes files."""
    from app.ml.distributed import this_rank

    return this_rank()[0] == 0


def _load_model(config: TrainingConfig) -> Any:
    from super_gradients.training import models

    from app.ml.checkpoints import checkpoint_num_classes, sg_safe_globals

    kwargs: dict[str, Any] = {"num_classes": len(config.class_names), "pretrained_weights": None}
    # A resume loads every weight from its checkpoint; the initial weights are not needed again.
    if config.init_checkpoint is not None and config.resume_from is None:
        # models.get replaces the head when the counts differ, but must be told the file's count.
        kwargs["checkpoint_path"] = str(config.init_checkpoint)
        kwargs["checkpoint_num_classes"] = checkpoint_num_classes(config.init_checkpoint)
    with sg_safe_globals():
        return models.get(config.model, **kwargs)


def import_training_modules() -> None:
    """Import what `run_training` uses (torch, super-gradients and this package's training modules),
    for a process that waits for its job (`worker.forkserver`), and every model's architecture
    parameters composed (`remember_arch_params`); SG's environment must be set already
    (`app.ml.sg_setup.child_environment`). Touches no device."""
    from super_gradients import Trainer  # noqa: F401
    from super_gradients.training import models  # noqa: F401
    from super_gradients.training.datasets.detection_datasets.coco_format_detection import (  # noqa: F401
        COCOFormatDetectionDataset,
    )
    from super_gradients.training.losses import PPYoloELoss  # noqa: F401
    from super_gradients.training.metrics import DetectionMetrics_050  # noqa: F401
    from super_gradients.training.models.detection_models.pp_yolo_e import (  # noqa: F401
        PPYoloEPostPredictionCallback,
    )
    from super_gradients.training.transforms import transforms  # noqa: F401
    from super_gradients.training.utils.collate_fn import DetectionCollateFN  # noqa: F401
    from torch.utils.data import DataLoader  # noqa: F401

    from app.ml import callbacks, checkpoints, sg_logger  # noqa: F401

    # Composing a model's architecture parameters is the slowest step of building it (YAML and Hydra).
    remember_arch_params(preload=get_args(ModelName))


def prewarm(device: str) -> str:
    """`import_training_modules` and set up `device` (a CUDA context and cuDNN loaded), for a training
    process that waits for its job. Returns the device; raises as `setup_device`."""
    import torch

    import_training_modules()
    chosen = setup_device(device)
    if chosen == "cuda":
        # The context and cuDNN load at the first convolution on the GPU: seconds, paid here.
        x = torch.zeros(1, 3, 32, 32, device="cuda")
        torch.nn.functional.conv2d(x, torch.zeros(8, 3, 3, 3, device="cuda"))
        torch.cuda.synchronize()
    return chosen


def run_training(config: TrainingConfig, reporter: Reporter) -> TrainingResult:
    """Train `config.model` on `config.train`, validating on `config.val`, reporting to `reporter`.

    Checkpoints go to `<job_dir>/checkpoints/train/RUN_*/` (`app.jobs.files` finds them), SG's logs
    to `<job_dir>/logs` unless SUPER_GRADIENTS_LOG_DIR is set already. Every checkpoint is written
    atomically and only while `reporter.holds_lease()` (see `ReporterSGLogger.add_checkpoint`).

    With `config.resume_from` (from `app.ml.checkpoints.pick_resume_checkpoint`), SG's resume goes on
    from that checkpoint: weights, optimizer, LR schedule, EMA, epoch, best metric so far and the
    averaging snapshots; epochs from the checkpoint's `next_epoch` to `max_epochs` (which may be
    larger than before) are trained, in the same run directory when the file lies in one of the job.

    Raises TrainingCancelled (after the reporter is flushed) when `reporter.should_stop()` turns
    true; the previous epoch's ckpt_latest.pth is then intact. Raises LeaseLost when the lease is
    lost at a checkpoint and DiskFull when one cannot be written (nothing replaced in either case).
    Raises ValueError for device "cuda" without CUDA or a resume checkpoint with more epochs done
    than max_epochs. Any other error propagates unchanged.
    """
    validate_config(config)
    prepare_this_process(config.job_dir / SG_LOG_DIR)
    from super_gradients.common.environment.device_utils import device_config
    from super_gradients.training.utils.utils import random_seed

    from app.ml.callbacks import ReporterCallback
    from app.ml.checkpoints import sg_safe_globals
    from app.ml.sg_logger import reporting_to

    spec = config.training
    try:
        device = setup_device(config.device, config.world_size)
        if spec.seed is not None:
            random_seed(is_ddp=config.world_size > 1, device=device_config.device, seed=spec.seed)
        # With all epochs done (killed after the last checkpoint) SG trains nothing and only runs
        # its final validation of the averaged model.
        resumed = _start_resume(config, reporter)
        train_set = _dataset(config.train, config, train=True)
        val_set = _dataset(config.val, config, train=False)
        train_loader = _dataloader(train_set, config, train=True)
        val_loader = _dataloader(val_set, config, train=False)
        model = _load_model(config)
        callback = ReporterCallback(
            reporter,
            max_epochs=spec.max_epochs,
            metric_to_watch=spec.metric_to_watch,
            best_value=resumed.best_value if resumed is not None else None,
            epochs_done=resumed.next_epoch if resumed is not None else 0,
        )
        trainer = _trainer(config.job_dir, resumed)
        ranks = f" × {config.world_size} processes (DDP)" if config.world_size > 1 else ""
        reporter.event(
            f"training {config.model} on {device}{ranks}: {len(train_set)} train / "
            f"{len(val_set)} valid images, {len(train_loader)} batches per epoch"
            + (" per process" if ranks else "")
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
