"""An SG logger that keeps SG's files (TensorBoard events, experiment logs) and forwards scalars.

Imports super_gradients (whose import rewires logging and stdout) and torch at its top: import it
only inside the training process, after `app.ml.sg_setup.prepare_this_process` (`run_training`
does both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import torch
from super_gradients.common.environment.ddp_utils import multi_process_safe
from super_gradients.common.registry.registry import register_sg_logger
from super_gradients.common.sg_loggers.base_sg_logger import BaseSGLogger
from super_gradients.common.sg_loggers.time_units import TimeUnit

from app.ml.types import MetricPoint, Reporter

LOGGER_NAME = "sgjobs_reporter"

# SG builds the logger itself from its registered name and a fixed set of kwargs, so the reporter
# cannot be passed in; run_training sets it here for the duration of one `trainer.train`.
_current_reporter: Reporter | None = None


@contextmanager
def reporting_to(reporter: Reporter) -> Iterator[None]:
    """Make `reporter` the target of every ReporterSGLogger created inside the block."""
    global _current_reporter
    previous, _current_reporter = _current_reporter, reporter
    try:
        yield
    finally:
        _current_reporter = previous


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
    def close(self) -> None:
        """Close SG's writers, then flush the reporter (also on the way out of a cancelled run)."""
        try:
            super().close()
        finally:
            self.reporter.flush()
