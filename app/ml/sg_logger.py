"""An SG logger that keeps SG's files (TensorBoard events, experiment logs) and forwards scalars,
and writes checkpoints and the averaging snapshots atomically, only while the job's lease is held.

Imports super_gradients (whose import rewires logging and stdout) and torch at its top: import it
only inside the training process, after `app.ml.sg_setup.prepare_this_process` (`run_training`
does both).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from super_gradients.common.environment.ddp_utils import multi_process_safe
from super_gradients.common.registry.registry import register_sg_logger
from super_gradients.common.sg_loggers.base_sg_logger import BaseSGLogger
from super_gradients.common.sg_loggers.time_units import TimeUnit
from super_gradients.training.utils.utils import move_state_dict_to_device, unwrap_model
from super_gradients.training.utils.weight_averaging_utils import ModelWeightAveraging

from app.ml.checkpoints import CheckpointPublisher, sg_safe_globals
from app.ml.layout import AVERAGING_SNAPSHOTS, LATEST_CHECKPOINT, PREVIOUS_LATEST_CHECKPOINT
from app.ml.types import LeaseLost, MetricPoint, Reporter

logger = logging.getLogger(__name__)

LOGGER_NAME = "sgjobs_reporter"

# SG builds the logger itself from its registered name and a fixed set of kwargs, so the reporter
# cannot be passed in; run_training sets it here for the duration of one `trainer.train`, with the
# publisher that puts the run's checkpoints and snapshots in place.
_current_reporter: Reporter | None = None
_current_publisher: CheckpointPublisher | None = None


@contextmanager
def reporting_to(reporter: Reporter) -> Iterator[None]:
    """Make `reporter` the target of every ReporterSGLogger created inside the block; every file
    they save is in place (or its failure raised) when the block ends."""
    global _current_reporter, _current_publisher
    previous = _current_reporter, _current_publisher
    publisher = CheckpointPublisher()
    _current_reporter, _current_publisher = reporter, publisher
    try:
        yield
    finally:
        try:
            publisher.close()
        finally:
            _current_reporter, _current_publisher = previous


def _publisher() -> CheckpointPublisher:
    if _current_publisher is None:
        raise RuntimeError("checkpoints saved outside app.ml.sg_logger.reporting_to()")
    return _current_publisher


def wait_for_checkpoints() -> None:
    """Until every file saved so far is in place; raises a failure to put one there (LeaseLost,
    DiskFull). For code that reads back what the run saved (SG's final average-model validation)."""
    _publisher().wait()


def _to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_step(global_step: int | TimeUnit | None) -> int | None:
    if isinstance(global_step, TimeUnit):
        global_step = global_step.get_value()
    return None if global_step is None else int(global_step)


@register_sg_logger(LOGGER_NAME)
class ReporterSGLogger(BaseSGLogger):
    """BaseSGLogger that also sends every scalar to the current reporter (`epoch` = SG's global_step).

    Names are SG's: "Train_PPYoloELoss/loss_cls", "Valid_mAP@0.50", "Valid_AP@0.50_<class>", "LR" or
    "LR/<group>", "Train Inference Time"; after training, the averaged model's validation comes
    without prefix ("mAP@0.50") at epoch = max_epochs.
    """

    def __init__(self, **kwargs: Any) -> None:
        if _current_reporter is None:
            raise RuntimeError(f"sg_logger '{LOGGER_NAME}' used outside app.ml.sg_logger.reporting_to()")
        self.reporter: Reporter = _current_reporter
        self.publisher = _publisher()
        super().__init__(**kwargs)

    def _forward(self, values: Mapping[str, Any], global_step: int | TimeUnit | None) -> None:
        now = datetime.now(UTC)
        epoch = _to_step(global_step)
        points = []
        for tag, raw in values.items():
            value = _to_float(raw)
            # NaN/inf are kept out of the service's JSON/DB; SG's own files still get them.
            if value is not None and math.isfinite(value):
                points.append(MetricPoint(name=tag, value=value, epoch=epoch, time=now))
        if points:
            self.reporter.metrics(points)

    @multi_process_safe
    def add_scalar(self, tag: str, scalar_value: float, global_step: int | TimeUnit | None = None) -> None:
        """Write to TensorBoard and forward to the reporter."""
        super().add_scalar(tag, scalar_value, global_step)
        self._forward({tag: scalar_value}, global_step)

    @multi_process_safe
    def add_scalars(self, tag_scalar_dict: dict[str, Any], global_step: int | None = None) -> None:
        """Write to TensorBoard and the experiment log, and forward to the reporter."""
        super().add_scalars(tag_scalar_dict, global_step)
        self._forward(tag_scalar_dict, global_step)

    @multi_process_safe
    def add_checkpoint(self, tag: str, state_dict: dict, global_step: int | None = None) -> None:
        """Write a checkpoint atomically and only while the lease is held (BaseSGLogger writes it in
        place: a crash or a full disk mid-save would destroy the last good one).

        The file is written here and put in place in the background (`CheckpointPublisher`).
        ckpt_latest.pth keeps its predecessor as ckpt_latest.previous.pth. Raises LeaseLost (nothing
        replaced) or DiskFull (the previous file intact), for this file or an earlier one; the
        `checkpoint_write` failpoint fires with epoch = `global_step`, SG's count of epochs completed.
        """
        name = f"ckpt_{global_step}.pth" if tag is None else tag
        if not name.endswith(".pth"):
            name += ".pth"
        path = Path(self._local_dir) / name
        previous = path.with_name(PREVIOUS_LATEST_CHECKPOINT) if name == LATEST_CHECKPOINT else None
        self.publisher.save(
            self._sanitize_checkpoint(state_dict),
            path,
            holds_lease=self.reporter.holds_lease,
            keep_previous_as=previous,
            epoch=_to_step(global_step),
        )
        if "best" in name:
            logger.info("Checkpoint saved in %s", path)
        if self.save_checkpoints_remote:
            self.model_checkpoints_data_interface.save_remote_checkpoints_file(
                self.experiment_name, self._local_dir, name
            )

    @multi_process_safe
    def close(self) -> None:
        """Close SG's writers, wait for the checkpoints, then flush the reporter (also on the way out
        of a cancelled run). Raises a failure to put a checkpoint in place that was not raised yet."""
        try:
            super().close()
            self.publisher.wait()
        finally:
            self.reporter.flush()


def _reporter() -> Reporter:
    # The averaging is built by the Trainer, which cannot pass the reporter; the training runs
    # inside reporting_to(), so the reporter is the current one.
    if _current_reporter is None:
        raise RuntimeError("model averaging used outside app.ml.sg_logger.reporting_to()")
    return _current_reporter


class AtomicModelWeightAveraging(ModelWeightAveraging):
    """SG's `average_best_models` snapshots, written atomically and fenced, and resumable exactly.

    SG's ModelWeightAveraging rewrites `averaging_snapshots.pkl` in place every epoch (a crash
    mid-write leaves a file that fails the next resume) and knows no epochs. Here each snapshot
    remembers the epoch count it was taken at (`snapshots_epoch`, set through `epoch` by the
    trainer before each save), so a resume from an older checkpoint drops the snapshots of the
    epochs it will train again; an unreadable snapshot file is replaced by an empty one.

    SG also reads the whole file back every epoch (up to 10 models: 0.1-0.5 s of the epoch turn for
    YOLO-NAS-S here) and rewrites it even when no snapshot changed. Here the snapshots stay in
    memory between epochs (the file is read only when a resumed run starts; SG holds them all at
    every epoch's end anyway, so the peak is the same), and the file is written only when they
    changed. A snapshot is a copy of the weights, never the live tensors SG's `state_dict()` gives.
    """

    def __init__(
        self,
        ckpt_dir: str,
        greater_is_better: bool,
        metric_to_watch: str,
        load_checkpoint: bool = False,
        resume_epoch: int | None = None,
        number_of_models_to_average: int = 10,
    ) -> None:
        # Not SG's __init__: it saves in place and fails hard on a damaged file.
        self.averaging_snapshots_file = os.path.join(ckpt_dir, AVERAGING_SNAPSHOTS)
        self.number_of_models_to_average = number_of_models_to_average
        self.metric_to_watch = metric_to_watch
        self.greater_is_better = greater_is_better
        self.epoch: int | None = None
        self._snapshots: dict[str, Any] | None = None  # what the file holds (or will, once in place)
        snapshots = None
        if load_checkpoint and os.path.isfile(self.averaging_snapshots_file):
            snapshots = self._resumed_snapshots(resume_epoch)
        if snapshots is None:
            self._save(self._empty())

    def _worst(self) -> float:
        return -np.inf if self.greater_is_better else np.inf

    def _empty(self) -> dict[str, Any]:
        n = self.number_of_models_to_average
        snapshots: dict[str, Any] = {f"snapshot{i}": None for i in range(n)}
        snapshots["snapshots_metric"] = self._worst() * np.ones(n)
        snapshots["snapshots_epoch"] = [None] * n
        return snapshots

    def _resumed_snapshots(self, resume_epoch: int | None) -> dict[str, Any] | None:
        """The snapshots on disk minus those taken after `resume_epoch` epochs; None if unreadable."""
        try:
            snapshots = self._get_averaging_snapshots_dict()
            metric = snapshots["snapshots_metric"]
        except Exception as exc:  # a file damaged by a crash: the averaging starts over
            message = (
                f"{AVERAGING_SNAPSHOTS} unreadable ({type(exc).__name__}: {exc}); model averaging starts over"
            )
            logger.warning(message)
            if _current_reporter is not None:
                _current_reporter.event(message, level="warning")
            return None
        n = self.number_of_models_to_average
        # SG's own files carry no epochs: their snapshots are kept.
        epochs = list(snapshots.get("snapshots_epoch") or [])[:n]
        epochs += [None] * (n - len(epochs))
        dropped = 0
        for i in range(n):
            if resume_epoch is not None and epochs[i] is not None and epochs[i] > resume_epoch:
                snapshots[f"snapshot{i}"] = None
                metric[i] = self._worst()
                epochs[i] = None
                dropped += 1
        snapshots["snapshots_epoch"] = epochs
        if dropped:
            self._save(snapshots)
        return snapshots

    def _save(self, snapshots: dict[str, Any]) -> None:
        # Not a checkpoint: the checkpoint_write failpoint stays on the .pth files.
        path = Path(self.averaging_snapshots_file)
        _publisher().save(snapshots, path, holds_lease=_reporter().holds_lease, failpoint=None)
        self._snapshots = snapshots

    def cleanup(self) -> None:
        """Delete the snapshot file at the end of training, unless another attempt owns the job now
        (its snapshots are in the same file)."""
        _publisher().wait()  # or a pending save would put the file back
        if not _reporter().holds_lease():
            raise LeaseLost(f"this attempt lost the job's lease: {AVERAGING_SNAPSHOTS} not deleted")
        Path(self.averaging_snapshots_file).unlink(missing_ok=True)

    def _get_averaging_snapshots_dict(self) -> dict[str, Any]:
        if self._snapshots is not None:
            return self._snapshots
        with sg_safe_globals():  # numpy's array globals, scoped (weights_only=True)
            snapshots = torch.load(self.averaging_snapshots_file, map_location="cpu", weights_only=True)
        if not isinstance(snapshots, dict):
            raise ValueError(f"{AVERAGING_SNAPSHOTS} holds a {type(snapshots).__name__}")
        snapshots.setdefault("snapshots_epoch", [None] * self.number_of_models_to_average)
        self._snapshots = snapshots
        return snapshots

    def update_snapshots_dict(
        self, model: torch.nn.Module, validation_results_dict: Mapping[str, float]
    ) -> dict:
        """Put a copy of `model`'s weights in place of the worst snapshot when it is better (SG's
        rule), with its epoch; saves the snapshots when they changed."""
        snapshots = self._get_averaging_snapshots_dict()
        require_update, index = self._is_better(snapshots, validation_results_dict)
        if require_update:
            # A copy (`.to("cpu")` alone returns the very tensors on the CPU, which train on).
            state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}
            snapshots[f"snapshot{index}"] = state
            snapshots["snapshots_metric"][index] = float(validation_results_dict[self.metric_to_watch])
            snapshots["snapshots_epoch"][index] = self.epoch
            self._save(snapshots)
        return snapshots

    def get_average_model(
        self, model: torch.nn.Module, validation_results_dict: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """Update the snapshots (when given this epoch's validation), return their average.

        The average is over the snapshots present, whichever slots they are in (SG assumes the first
        slots are filled, which dropping superseded snapshots on resume would break).
        """
        if validation_results_dict is not None:
            snapshots = self.update_snapshots_dict(model, validation_results_dict)
        else:
            snapshots = self._get_averaging_snapshots_dict()
        present = [
            sd
            for i in range(self.number_of_models_to_average)
            if (sd := snapshots.get(f"snapshot{i}")) is not None
        ]
        if not present:  # only non-finite metrics so far: nothing averaged yet
            return move_state_dict_to_device(unwrap_model(model).state_dict(), "cpu")
        average = dict(present[0])
        for count, state in enumerate(present[1:], start=1):
            # SG's running mean, key by key.
            for key in average:
                average[key] = torch.true_divide(average[key] * count + state[key], count + 1)
        return average
