"""Entry point of the per-job training process: `python -m worker.train_process JOB_ID`.

Validates the dataset first (seconds, before super-gradients is even imported), then trains, and
writes how it ended to `result.json` in the job directory for the supervising worker to record.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from app.datasets import service as datasets
from app.datasets.formats import prepare_dataset
from app.db import session_scope
from app.errors import DatasetError, InvalidInput
from app.jobs import lifecycle, service
from app.jobs.models import FailureReason, JobStatus
from app.jobs.schemas import JobSpec
from app.ml.types import TrainingCancelled, TrainingConfig, TrainingParams
from app.settings import Settings, get_settings
from worker.reporter import DbReporter
from worker.runner import RESULT_FILE, record_outcome

logger = logging.getLogger("sgjobs.train")


def _write_result(job_dir: Path, result: dict[str, Any]) -> None:
    tmp = job_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / RESULT_FILE)


def _params(spec: JobSpec, settings: Settings) -> TrainingParams:
    t = spec.training
    return TrainingParams(
        max_epochs=t.max_epochs,
        batch_size=t.batch_size,
        initial_lr=t.initial_lr,
        warmup_initial_lr=t.warmup_initial_lr,
        lr_warmup_epochs=t.lr_warmup_epochs,
        lr_mode=t.lr_mode,
        cosine_final_lr_ratio=t.cosine_final_lr_ratio,
        optimizer=t.optimizer,
        weight_decay=t.weight_decay,
        zero_weight_decay_on_bias_and_bn=t.zero_weight_decay_on_bias_and_bn,
        ema=t.ema,
        ema_beta=t.ema_beta,
        average_best_models=t.average_best_models,
        mixed_precision=t.mixed_precision,
        metric_to_watch=t.metric_to_watch,
        num_workers=settings.dataloader_workers,
        seed=t.seed,
    )


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def train(settings: Settings, job_id: str) -> dict[str, Any]:
    """Prepare the dataset and train; returns the result record (status, reason, message, ...)."""
    job_dir = settings.jobs_dir / job_id
    with session_scope(settings.database_url) as session:
        job = service.get_job(session, job_id=job_id)
        spec = JobSpec.model_validate(job.spec)
        try:
            resolved: datasets.ResolvedDataset | InvalidInput = datasets.resolve_spec(
                session, settings=settings, spec=spec.dataset, resolve_path=service.resolve_dataset_root
            )
        except InvalidInput as exc:  # the dataset was deleted or moved since the job was queued
            resolved = exc
        init_checkpoint: Path | None = None
        init_job = spec.init_from.job_id if spec.init_from is not None else None
        if init_job is not None:
            source = service.get_job(session, job_id=init_job)
            init_checkpoint = service.checkpoint_for_init(source)
            if init_checkpoint is None:
                return {
                    "status": JobStatus.failed,
                    "reason": FailureReason.invalid_checkpoint,
                    "message": f"job {source.id} has no checkpoint any more",
                }
    reporter = DbReporter(
        database_url=settings.database_url,
        job_id=job_id,
        interval=settings.report_interval_seconds,
        watch=spec.training.metric_to_watch,
        greater_is_better=spec.training.greater_is_better,
    ).start()
    try:
        try:
            if isinstance(resolved, InvalidInput):
                raise resolved
            prepared = prepare_dataset(
                resolved.root,
                resolved.options,
                job_dir / "dataset",
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
                message = f"cannot start from {init_checkpoint.name} of job {init_job}: {exc}"
                reporter.event(message, level="error")
                return {
                    "status": JobStatus.failed,
                    "reason": FailureReason.invalid_checkpoint,
                    "message": message,
                }
            reporter.event(f"starting from {init_checkpoint.name} ({classes} classes) of job {init_job}")
        config = TrainingConfig(
            job_id=job_id,
            model=spec.model,
            job_dir=job_dir,
            class_names=tuple(prepared.class_names),
            train=prepared.train,
            val=prepared.val,
            input_size=spec.input_size,
            params=_params(spec, settings),
            init_checkpoint=init_checkpoint,
            device=settings.device,  # type: ignore[arg-type]
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
    _write_result(job_dir, {k: (v.value if hasattr(v, "value") else v) for k, v in result.items()})
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
