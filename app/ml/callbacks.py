"""SG phase callback: per-batch loss and LR, progress, best metric, and cancellation within a batch.

Imports super_gradients at its top: import it only inside the training process, after
`app.ml.sg_setup.prepare_this_process` (`run_training` does both).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from super_gradients.training.utils.callbacks import Callback, PhaseContext

from app import failpoints
from app.ml.distributed import agreed, this_rank
from app.ml.types import (
    BATCH_PREFIX,
    IMAGES_PER_SECOND,
    MetricPoint,
    Reporter,
    TrainingCancelled,
    greater_is_better,
)


class ReporterCallback(Callback):
    """Reports per-batch metrics and progress, and raises TrainingCancelled at the next batch boundary.

    Conventions: `epoch` is SG's 0-based epoch index everywhere; per-batch MetricPoints carry
    `step` = epoch * batches_per_epoch + batch index (0-based) and their epoch; progress `batch` is
    the number of batches finished in the current epoch.
    """

    def __init__(
        self,
        reporter: Reporter,
        max_epochs: int,
        metric_to_watch: str,
        *,
        best_value: float | None = None,
        epochs_done: int = 0,
    ) -> None:
        """`best_value` and `epochs_done`: what a resumed run's checkpoint already has (the best
        watched value and the epochs completed), so the result counts the whole training."""
        self.reporter = reporter
        self.max_epochs = max_epochs
        self.metric_to_watch = metric_to_watch
        self.greater_is_better = greater_is_better(metric_to_watch)
        self.best_value: float | None = best_value
        self.epochs_validated = epochs_done
        # perf_counter when the previous training batch ended (or the epoch's loader started).
        self._batch_started: float | None = None

    def _check_stop(self, where: str) -> None:
        # SG's own context.stop_training is read only at the next epoch start (issue #1151); an
        # exception stops now, and SG's `finally` still closes the logger. ckpt_latest.pth is only
        # written after validation, so the last finished epoch's checkpoint stays intact.
        # In a data-parallel job rank 0 decides (the others' reporters never stop) and every rank
        # stops at the same batch, or the others would wait in their next collective.
        if agreed(self.reporter.should_stop()):
            raise TrainingCancelled(f"training cancelled during {where}")

    def on_train_loader_start(self, context: PhaseContext) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, context: PhaseContext) -> None:
        """Report loss components, learning rate, throughput and progress; then honour a cancel request."""
        ended = time.perf_counter()
        epoch = int(context.epoch)
        batch_idx = int(context.batch_idx)
        batches = len(context.train_loader) if context.train_loader is not None else batch_idx + 1
        step = epoch * batches + batch_idx
        now = datetime.now(UTC)
        points = []
        if context.loss_log_items is not None and context.loss_logging_items_names:
            values = context.loss_log_items.detach().float().cpu().flatten().tolist()
            for name, value in zip(context.loss_logging_items_names, values, strict=False):
                if math.isfinite(value):
                    points.append(MetricPoint(BATCH_PREFIX + name, value, epoch=epoch, step=step, time=now))
        if context.optimizer is not None and context.optimizer.param_groups:
            # All groups share one schedule (the bias/BN group differs only in weight decay).
            lr = float(context.optimizer.param_groups[0]["lr"])
            points.append(MetricPoint(BATCH_PREFIX + "LR", lr, epoch=epoch, step=step, time=now))
        # Every rank of a data-parallel job trains a batch of this size at this step: the job's rate.
        images = len(context.inputs) * this_rank()[1] if context.inputs is not None else 0
        if self._batch_started is not None and images and ended > self._batch_started:
            rate = images / (ended - self._batch_started)
            points.append(MetricPoint(IMAGES_PER_SECOND, rate, epoch=epoch, step=step, time=now))
        self._batch_started = ended
        if points:
            self.reporter.metrics(points)
        self.reporter.progress(
            epoch=epoch, max_epochs=self.max_epochs, batch=batch_idx + 1, batches_per_epoch=batches
        )
        failpoints.hit("train_batch", epoch=epoch, batch=batch_idx)
        self._check_stop(f"epoch {epoch} train batch {batch_idx}")

    def on_validation_batch_end(self, context: PhaseContext) -> None:
        """Honour a cancel request between validation batches too (validation can be long)."""
        self._check_stop(f"epoch {context.epoch} validation batch {context.batch_idx}")

    def on_validation_loader_end(self, context: PhaseContext) -> None:
        """Track the best watched metric (same rule SG uses to pick ckpt_best.pth)."""
        self.epochs_validated += 1
        raw = (context.metrics_dict or {}).get(self.metric_to_watch)
        if raw is None:
            return
        value = float(raw)
        if not math.isfinite(value):
            return
        if (
            self.best_value is None
            or (self.greater_is_better and value > self.best_value)
            or (not self.greater_is_better and value < self.best_value)
        ):
            self.best_value = value
        self.reporter.event(
            f"epoch {int(context.epoch) + 1}/{self.max_epochs}: {self.metric_to_watch}={value:.4f}"
            f" (best {self.best_value:.4f})"
        )
