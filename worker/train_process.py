"""Entry point of the per-job training process: `python -m worker.train_process JOB_ID`.

Validates the dataset first (seconds, before super-gradients is even imported), then trains, and
writes how it ended to its result file in the job directory (`worker.outcome`) and records it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.datasets import service as datasets
from app.datasets.formats import prepare_dataset
from app.db import session_scope
from app.errors import DatasetError, InvalidInput
from app.jobs import files, lifecycle, service
from app.jobs.models import FailureReason, JobStatus
from app.jobs.schemas import JobSpec
from app.ml.params import TrainingConfig
from app.ml.types import TrainingCancelled
from app.settings import Settings, get_settings
from app.weights import service as weights
from app.weights.models import Weights
from worker.outcome import record_outcome, write_result
from worker.reporter import DbReporter

logger = logging.getLogger("sgjobs.train")


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class InitCheckpointGone(Exception):
    """What the job was to start from is gone since it was queued (the message says what)."""


def _init_checkpoint(
    session: Session, settings: Settings, spec: JobSpec, started_from: dict[str, Any]
) -> tuple[Path | None, str]:
    """The checkpoint file the job starts from (None: random weights) and how to name its source."""
    if spec.init_from is not None and spec.init_from.job_id is not None:
        source = service.get_job(session, job_id=spec.init_from.job_id)
        checkpoint = files.init_checkpoint(source)
        if checkpoint is None:
            raise InitCheckpointGone(f"job {source.id} has no checkpoint any more")
        return checkpoint, f"job {source.id}"
    weights_id = started_from.get("weights_id")
    if weights_id is None:
        return None, ""
    path = weights.weights_file(settings, weights_id)
    if session.get(Weights, weights_id) is None or not path.is_file():
        raise InitCheckpointGone(f"weights {weights_id} are no longer registered (or their file is gone)")
    return path, f"weights {weights_id} ({started_from.get('name') or weights_id})"


def train(settings: Settings, job_id: str) -> dict[str, Any]:
    """Prepare the dataset and train; returns the result record (status, reason, message, ...)."""
    job_dir = settings.jobs_dir / job_id
    with session_scope(settings.database_url) as session:
        job = service.get_job(session, job_id=job_id)
        spec = JobSpec.model_validate(job.spec)
        try:
            resolved: datasets.ResolvedDataset | InvalidInput = datasets.resolve_spec(
                session, settings=settings, spec=spec.dataset
            )
        except InvalidInput as exc:  # the dataset was deleted or moved since the job was queued
            resolved = exc
        started_from = dict(job.started_from or {})
        try:
            init_checkpoint, init_label = _init_checkpoint(session, settings, spec, started_from)
        except InitCheckpointGone as exc:
            return {
                "status": JobStatus.failed,
                "reason": FailureReason.invalid_checkpoint,
                "message": str(exc),
            }
    reporter = DbReporter(
        database_url=settings.database_url,
        job_id=job_id,
        interval=settings.report_interval_seconds,
        watch=spec.training.metric_to_watch,
    ).start()
    try:
        try:
            if isinstance(resolved, InvalidInput):
                raise resolved
            prepared = prepare_dataset(
                resolved.root,
                resolved.options,
                files.dataset_dir(job_dir),
                datasets.cache_root(settings, resolved.root),
            )
        except (DatasetError, InvalidInput) as exc:
            details = exc.details if isinstance(exc.details, list) else None
            reporter.event(exc.message, level="error", data={"problems": details} if details else None)
            return {"status": JobStatus.failed, "reason": FailureReason.dataset_error, "message": exc.message}
        for warning in prepared.warnings:
            reporter.event(warning, level="warning")
        reporter.event(
            f"dataset ready: {len(prepared.class_names)} classes, {prepared.train.num_images} training and "
            f"{prepared.val.num_images} validation images"
        )
        with session_scope(settings.database_url) as session:
            lifecycle.set_classes(session, job_id=job_id, classes=prepared.class_names)
        if reporter.should_stop():
            raise TrainingCancelled("cancelled before training started")
        if init_checkpoint is not None:
            from app.ml.checkpoints import checkpoint_num_classes

            try:
                classes = checkpoint_num_classes(init_checkpoint)
            except Exception as exc:
                message = f"cannot start from {init_checkpoint.name} of {init_label}: {exc}"
                reporter.event(message, level="error")
                return {
                    "status": JobStatus.failed,
                    "reason": FailureReason.invalid_checkpoint,
                    "message": message,
                }
            head = (
                f"; its head is re-initialised for {len(prepared.class_names)} classes"
                if classes != len(prepared.class_names)
                else ""
            )
            reporter.event(f"starting from {init_checkpoint.name} ({classes} classes) of {init_label}{head}")
            with session_scope(settings.database_url) as session:
                lifecycle.set_started_from(
                    session,
                    job_id=job_id,
                    started_from={**started_from, "checkpoint": init_checkpoint.name, "num_classes": classes},
                )
        config = TrainingConfig(
            model=spec.model,
            job_dir=job_dir,
            class_names=tuple(prepared.class_names),
            train=prepared.train,
            val=prepared.val,
            input_size=spec.input_size,
            training=spec.training,
            num_workers=settings.dataloader_workers,
            init_checkpoint=init_checkpoint,
            device=settings.device,
        )
        # Imported only now: super-gradients takes seconds to import and rewires this process.
        from app.ml.training import run_training

        result = run_training(config, reporter)
        return {
            "status": JobStatus.succeeded,
            "device": result.device,
            "best_value": result.best_metric_value if result.best_metric_value is not None else reporter.best,
            "epochs": result.epochs_completed,
        }
    except TrainingCancelled as exc:
        reporter.event(f"training stopped: {exc}", data={"stopped": True})
        return {"status": JobStatus.cancelled, "best_value": reporter.best}
    except Exception as exc:
        traceback.print_exc()
        # The traceback also goes on the job, so a failure can be understood from the API alone.
        reporter.event(
            f"training failed: {type(exc).__name__}: {exc}",
            level="error",
            data={"traceback": traceback.format_exc(limit=20)[-8000:]},
        )
        if _is_oom(exc):
            return {
                "status": JobStatus.failed,
                "reason": FailureReason.out_of_memory,
                "message": f"out of memory: {exc}; lower training.batch_size or input_size",
            }
        return {
            "status": JobStatus.failed,
            "reason": FailureReason.internal,
            "message": f"{type(exc).__name__}: {exc}",
        }
    finally:
        reporter.close()


def main(argv: list[str] | None = None) -> int:
    """Run one job; always leaves a result file unless the process itself is killed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m worker.train_process JOB_ID", file=sys.stderr)
        return 2
    job_id = args[0]
    settings = get_settings()
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(settings, job_id)
    except Exception as exc:
        traceback.print_exc()
        result = {
            "status": JobStatus.failed,
            "reason": FailureReason.internal,
            "message": f"{type(exc).__name__}: {exc}",
        }
    write_result(job_dir, result)
    # Record the outcome now rather than after this process exits: tearing down torch and
    # super-gradients takes seconds, and a cancelled job should show as cancelled at once. The
    # supervising worker records it again after the exit, which the conditional update makes a no-op.
    try:
        record_outcome(settings, job_id=job_id, job_dir=job_dir, returncode=0, killed_for_cancel=False)
    except Exception:
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
