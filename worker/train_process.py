"""Entry point of the per-attempt training process: `python -m worker.train_process JOB_ID ATTEMPT`.

Or a child of the worker's fork server (`worker.forkserver`), which has imported super-gradients
before the attempt was claimed, runs the attempt in the same way (`run_attempt`), its command line
rewritten to the one above.

Validates the dataset first (seconds, before super-gradients is even imported), then trains (from
the newest valid checkpoint of an earlier attempt, if there is one), and writes how it ended to its
result file in the job directory (`worker.outcome`) and records it. Every write is fenced by the
attempt's lease; once the job has moved on, the process exits with `LEASE_LOST_EXIT` and writes
nothing more.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import failpoints
from app.datasets import service as datasets
from app.datasets.formats import prepare_dataset
from app.db import release_connection, session_scope
from app.errors import DatasetError, InvalidInput
from app.jobs import files, lifecycle, service, stored
from app.jobs.models import FailureReason, JobStatus
from app.jobs.schemas import JobSpec
from app.ml.params import TrainingConfig
from app.ml.types import DiskFull, LeaseLost, TrainingCancelled
from app.settings import Settings, get_settings
from app.storage import StorageError
from app.weights import service as weights
from app.weights.models import Weights
from worker.outcome import LEASE_LOST_EXIT, LOST, killed_by_oom_killer, record_outcome, tail, write_result
from worker.ranks import helper_ranks
from worker.reporter import DbReporter
from worker.store_sync import JobSync, Uploader, job_sync

logger = logging.getLogger("sgjobs.train")


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class InitCheckpointGone(Exception):
    """What the job was to start from is gone since it was queued (the message says what)."""


def _init_checkpoint(
    session: Session, settings: Settings, spec: JobSpec, started_from: dict[str, Any]
) -> tuple[Path | None, str]:
    """The checkpoint file the job starts from (None: random weights) and how to name its source.

    With a remote store the file is a download (minutes for a large model): `session`'s connection
    is given back first (it has only read)."""
    if spec.init_from is not None and spec.init_from.job_id is not None:
        source = service.get_job(session, job_id=spec.init_from.job_id, scope=None)
        release_connection(session)
        checkpoint = stored.local_checkpoint(settings, source, files.CKPT_BEST, files.CKPT_LATEST)
        if checkpoint is None:
            raise InitCheckpointGone(f"job {source.id} has no checkpoint any more")
        return checkpoint, f"job {source.id}"
    weights_id = started_from.get("weights_id")
    if weights_id is None:
        return None, ""
    registered = session.get(Weights, weights_id) is not None
    release_connection(session)
    path = weights.local_file(settings, weights_id) if registered else None
    if path is None:
        raise InitCheckpointGone(f"weights {weights_id} are no longer registered (or their file is gone)")
    return path, f"weights {weights_id} ({started_from.get('name') or weights_id})"


@contextmanager
def fenced(settings: Settings, job_id: str, attempt: int) -> Iterator[Session]:
    """A transaction that writes for `attempt` only while it holds the job; else LeaseLost."""
    with session_scope(settings.database_url) as session:
        if not lifecycle.renew(session, job_id=job_id, attempt=attempt, lease_seconds=settings.lease_seconds):
            raise LeaseLost(f"job {job_id} moved on from attempt {attempt}")
        yield session


def _init_gone(exc: InitCheckpointGone) -> dict[str, Any]:
    return {"status": JobStatus.failed, "reason": FailureReason.invalid_checkpoint, "message": str(exc)}


def train(
    settings: Settings, job_id: str, attempt: int, standby: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prepare the dataset and train; returns the result record (status, reason, message, ...).

    `standby`: how this process waited for the attempt, when it was started ahead of it (forked by
    the worker's fork server, or a spare): an event says so, with these values and `"standby": true`.
    """
    job_dir = settings.jobs_dir / job_id
    sync = job_sync(settings, job_dir, job_id)
    if sync is not None:
        try:
            # Before anything looks for a checkpoint to resume from: another machine may have trained
            # this job further than what this one holds.
            sync.pull_checkpoints()
        except StorageError as exc:
            return {"status": JobStatus.failed, "reason": FailureReason.internal, "message": str(exc)}
    with session_scope(settings.database_url) as session:
        # The worker acts for the service, not for a tenant: it reads any job.
        job = service.get_job(session, job_id=job_id, scope=None)
        spec = JobSpec.model_validate(job.spec)
        failpoints.set_context(job_name=spec.name, attempt=attempt)
        try:
            resolved: datasets.ResolvedDataset | InvalidInput = datasets.resolve_spec(
                # What the job's creator could use then, it can use now.
                session,
                settings=settings,
                spec=spec.dataset,
                scope=job.scope,
            )
        except InvalidInput as exc:  # the dataset was deleted or moved since the job was queued
            resolved = exc
        started_from = dict(job.started_from or {})
        init_gone: InitCheckpointGone | None = None
        try:
            init_checkpoint, init_label = _init_checkpoint(session, settings, spec, started_from)
        except InitCheckpointGone as exc:
            # An attempt that resumes from its own checkpoint no longer needs what the job started from.
            if not files.resume_candidates(job_dir):
                return _init_gone(exc)
            init_checkpoint, init_label, init_gone = None, "", exc
    reporter = DbReporter(
        database_url=settings.database_url,
        job_id=job_id,
        attempt=attempt,
        lease_seconds=settings.lease_seconds,
        interval=settings.report_interval_seconds,
        watch=spec.training.metric_to_watch,
    ).start()
    uploader = Uploader(sync, settings.storage_sync_seconds).start() if sync is not None else None
    if standby is not None:
        forked = f", forked by fork server {standby['fork_server']}," if standby.get("fork_server") else ""
        reporter.event(
            f"warm start: training process {os.getpid()}{forked} was ready (super-gradients imported, "
            f"device set up) {standby['waited_s']:.1f} s before this attempt",
            data={"standby": True, **standby},
        )
    try:
        try:
            if isinstance(resolved, InvalidInput):
                raise resolved
            prepared = prepare_dataset(
                resolved.root,
                resolved.options,
                files.dataset_dir(job_dir),
                datasets.cache_root(settings, resolved.root),
                annotation_max_bytes=settings.annotation_max_bytes,
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
        if spec.gpus > settings.worker_gpus_per_slot:
            # Routing sends such a job only to slots that offer enough (`app.queue.queue_for`).
            message = (
                f"the job asks for {spec.gpus} GPUs, this worker's slot offers "
                f"{settings.worker_gpus_per_slot} (SGJOBS_WORKER_GPUS_PER_SLOT)"
            )
            reporter.event(message, level="error")
            return {"status": JobStatus.failed, "reason": FailureReason.internal, "message": message}
        with fenced(settings, job_id, attempt) as session:
            lifecycle.set_classes(session, job_id=job_id, classes=prepared.class_names)
        # Imported only now (torch), after the dataset checks that fail fast without it.
        from app.ml.checkpoints import pick_resume_checkpoint

        # The newest checkpoint of an earlier attempt that loads, if any; the points that attempt
        # wrote from that epoch on are superseded by this one's.
        resume = pick_resume_checkpoint(job_dir)
        if resume is None and init_gone is not None:
            return _init_gone(init_gone)
        if resume is not None:
            reporter.flush()
            with fenced(settings, job_id, attempt) as session:
                lifecycle.supersede_from_epoch(
                    session,
                    job_id=job_id,
                    epoch=resume.next_epoch,
                    metric_to_watch=spec.training.metric_to_watch,
                )
                reporter.resume_best(service.get_job(session, job_id=job_id, scope=None).best_metric_value)
        if reporter.should_stop():
            raise TrainingCancelled("cancelled before training started")
        if resume is not None:
            skipped = f"; skipped {', '.join(resume.skipped)}" if resume.skipped else ""
            reporter.event(
                f"attempt {attempt} resumes from {resume.path.name} at epoch {resume.next_epoch + 1}"
                f"/{spec.training.max_epochs}{skipped}",
                data={"attempt": attempt, "checkpoint": resume.path.name, "next_epoch": resume.next_epoch},
            )
            init_checkpoint = None  # the resumed checkpoint has the weights and everything else
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
            with fenced(settings, job_id, attempt) as session:
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
            resume_from=resume.path if resume is not None else None,
            device=settings.device,
            world_size=spec.gpus,
        )
        # Imported only now: super-gradients takes seconds to import and rewires this process.
        from app.ml.training import run_training

        with helper_ranks(
            settings,
            config,
            log_dir=files.sg_log_dir(job_dir),
            on_lost=lambda message, returncode: _rank_lost(job_dir, attempt, message, returncode),
        ):
            result = run_training(config, reporter)
        if settings.serving_export:
            _export_for_serving(spec.model, job_dir, reporter)
        if uploader is not None and sync is not None:
            # Everything is in the store before success is recorded: the API serves it from there.
            uploader.stop()
            uploader = None
            unreachable = _final_push(settings, sync, reporter)
            if unreachable is not None:
                # The model is trained and checkpointed here; a later attempt (this machine's or
                # another's, once the store answers) resumes from the checkpoints and uploads it.
                return {
                    "status": JobStatus.failed,
                    "reason": FailureReason.storage_unavailable,
                    "message": f"the trained model could not be uploaded to the object store for "
                    f"{settings.storage_retry_seconds:g} s: {unreachable}",
                    LOST: True,
                }
        return {
            "status": JobStatus.succeeded,
            "device": result.device,
            "best_value": result.best_metric_value if result.best_metric_value is not None else reporter.best,
            "epochs": result.epochs_completed,
        }
    except LeaseLost:
        raise
    except TrainingCancelled as exc:
        reporter.event(f"training stopped: {exc}", data={"stopped": True})
        return {"status": JobStatus.cancelled, "best_value": reporter.best}
    except DiskFull as exc:
        reporter.event(f"training stopped: {exc}", level="error")
        return {"status": JobStatus.failed, "reason": FailureReason.disk_full, "message": str(exc)}
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
        if uploader is not None and sync is not None:
            uploader.stop()
            if not reporter.lost:
                _push_quietly(sync, reporter)
        reporter.close()
        if reporter.lost:
            raise LeaseLost(f"job {job_id} moved on from attempt {attempt}")


def _rank_lost(job_dir: Path, attempt: int, message: str, returncode: int) -> None:
    """End this process (rank 0) at once after another rank of the job died (`returncode` is its
    exit code): this one may wait in a collective that will never complete. A rank killed by a
    signal makes the attempt a lost one (resumed from the last checkpoint while restarts remain);
    any other exit fails the job."""
    killed = returncode < 0
    last = tail(files.console_log(job_dir))
    oom = killed_by_oom_killer(returncode) or "out of memory" in last.lower()
    reason = FailureReason.internal
    if oom:
        reason = FailureReason.out_of_memory
    elif killed:
        reason = FailureReason.worker_lost
    result: dict[str, Any] = {
        "status": JobStatus.failed,
        "reason": reason,
        "message": message if killed or not last else f"{message}; last output:\n{last}",
    }
    if killed:
        result[LOST] = True
    try:
        write_result(job_dir, attempt, result)
    finally:
        os._exit(1)


def _final_push(settings: Settings, sync: JobSync, reporter: DbReporter) -> str | None:
    """Upload everything, trying again while the store is unreachable (up to
    `storage_retry_seconds`, backing off to 30 s); None once stored, else the store's last error."""
    deadline = time.monotonic() + settings.storage_retry_seconds
    delay = 1.0
    while True:
        try:
            failpoints.hit("final_upload")
            sync.push()
            return None
        except StorageError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                return str(exc)
            pause = min(delay, left)
            reporter.event(
                f"the trained model could not be uploaded to the object store ({exc}); trying again "
                f"in {pause:.0f} s",
                level="warning",
            )
            if reporter.should_stop():
                raise TrainingCancelled("cancelled while the object store was unreachable") from exc
            time.sleep(pause)
            delay = min(2 * delay, 30.0)


def _push_quietly(sync: JobSync, reporter: DbReporter) -> None:
    """The last upload of an attempt that failed or was cancelled: its checkpoints let a later attempt
    resume on any machine; failing it leaves the job's outcome as it is."""
    try:
        sync.push()
    except StorageError as exc:
        reporter.event(f"the last checkpoints could not be uploaded to the store: {exc}", level="warning")


def _export_for_serving(model: str, job_dir: Path, reporter: DbReporter) -> None:
    """Export the best checkpoint for onnxruntime (`app.ml.export.export_job_for_serving`) before the
    job is recorded as succeeded, so the API's warmer finds the fast path ready at once; a failure is
    an event, and PyTorch serves the model."""
    from app.ml.export import export_job_for_serving

    try:
        exported = export_job_for_serving(model, job_dir)
    except Exception as exc:  # SG and torch raise many types; the job's result stands either way
        reporter.event(
            f"serving export failed, /predict uses PyTorch for this model: {type(exc).__name__}: {exc}",
            level="warning",
        )
        return
    if exported is not None:
        name = Path(exported.path).name
        reporter.event(
            f"exported for serving with onnxruntime in {exported.seconds:.1f} s "
            f"({name}, {exported.size / 2**20:.1f} MiB)",
            data={"serving_onnx": name, "seconds": round(exported.seconds, 3)},
        )


def run_attempt(settings: Settings, job_id: str, attempt: int, standby: dict[str, Any] | None = None) -> int:
    """Run one attempt in this process and return its exit code; leaves a result file unless the
    process is killed or the job moved on. `standby`: as for `train` (a forked or spare process)."""
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = train(settings, job_id, attempt, standby)
    except LeaseLost as exc:
        logger.warning("%s: stopping without writing anything more", exc)
        return LEASE_LOST_EXIT
    except Exception as exc:
        traceback.print_exc()
        result = {
            "status": JobStatus.failed,
            "reason": FailureReason.internal,
            "message": f"{type(exc).__name__}: {exc}",
        }
    write_result(job_dir, attempt, result)
    if result.get(LOST):
        return 0  # its supervisor records a lost attempt, and sends the job again
    # Record the outcome now rather than after this process exits: tearing down torch and
    # super-gradients takes seconds, and a cancelled job should show as cancelled at once. The
    # supervising worker records it again after the exit, which the conditional update makes a no-op.
    try:
        record_outcome(
            settings, job_id=job_id, attempt=attempt, job_dir=job_dir, returncode=0, killed_for_cancel=False
        )
    except Exception:
        traceback.print_exc()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the attempt named on the command line (a process started for it)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m worker.train_process JOB_ID ATTEMPT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_attempt(get_settings(), args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
