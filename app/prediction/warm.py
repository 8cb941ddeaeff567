"""The model warmer: a freshly succeeded job's model is loaded into the inference process before
anyone asks for it, so the first /predict after success is as fast as the next ones.

One daemon thread per API process starts the inference process, then polls the database every
`predict_warm_poll_seconds` for jobs that succeeded since it last looked (the worker exports the
serving ONNX before it records success, so the model loads on the onnxruntime path when that export
worked) and asks the inference process to load each one's best checkpoint (op `preload`: the same
load a /predict would do, into the same bounded cache). Jobs that succeeded before this process
started are not loaded: a restart must not fill the cache with models nobody asked for.

A failure to warm is logged and forgotten: /predict loads the model itself, as it would without
the warmer.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from app.db import session_scope, utcnow
from app.errors import AppError
from app.inference import call_model_server
from app.jobs import files, stored
from app.jobs.service import succeeded_since
from app.settings import Settings

logger = logging.getLogger(__name__)

# At most this many jobs are loaded per look; more than the cache holds would only evict each other.
WARM_BATCH = 8
PRELOAD_TIMEOUT_SECONDS = 120.0


def warm_new_models(settings: Settings, *, since: datetime) -> datetime:
    """Load the models of the jobs that succeeded after `since`; returns the new watermark."""
    with session_scope(settings.database_url) as session:
        jobs = succeeded_since(session, since=since, limit=min(WARM_BATCH, settings.predict_cache_size))
    # The jobs stay readable once their session is closed (expire_on_commit is off); a remote
    # store's checkpoint is downloaded with no database connection held.
    for job in jobs:
        job_id, model, finished_at = job.id, job.model, job.finished_at
        assert finished_at is not None  # succeeded jobs have finished
        since = max(since, finished_at)
        try:
            checkpoint = stored.local_checkpoint(settings, job, files.CKPT_BEST)
        except AppError as exc:  # the store unreachable, say
            logger.warning("could not fetch job %s's checkpoint to warm its model: %s", job_id, exc)
            continue
        if checkpoint is None:
            continue
        try:
            answer = call_model_server(
                settings,
                "preload",
                timeout=PRELOAD_TIMEOUT_SECONDS,
                model=model,
                checkpoint=str(checkpoint),
                class_names=None,
            )
            logger.info("warmed job %s's model (%s)", job_id, answer.get("backend", "?"))
        except AppError as exc:
            logger.warning("could not warm job %s's model: %s", job_id, exc)
    return since


def run_forever(settings: Settings, *, stop: threading.Event) -> None:
    """Warm new models every `predict_warm_poll_seconds` until `stop` is set."""
    since = utcnow()
    try:
        # The inference process starts now rather than with the first model to warm: on the CPU it
        # imports neither torch nor SG until a model needs them (under a second), on a GPU it makes
        # the device ready (seconds) while nobody waits.
        call_model_server(settings, "stats", timeout=PRELOAD_TIMEOUT_SECONDS)
    except AppError as exc:
        logger.warning("could not start the inference process: %s", exc)
    while not stop.wait(settings.predict_warm_poll_seconds):
        try:
            since = warm_new_models(settings, since=since)
        except Exception:  # the database away, say: try again at the next look
            logger.exception("warming models failed")


def start(settings: Settings, *, stop: threading.Event) -> threading.Thread | None:
    """The warmer as a daemon thread, or None when `predict_warm` is off."""
    if not settings.predict_warm:
        return None
    thread = threading.Thread(
        target=run_forever, args=(settings,), kwargs={"stop": stop}, name="sgjobs-model-warmer", daemon=True
    )
    thread.start()
    return thread
