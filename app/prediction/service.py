"""Prediction: find a job's best checkpoint (or registered weights), check the uploads, ask the
inference process.

Every image's header is read here, in the API process, first (`app.images.open_image`): its format
(only `IMAGE_FORMATS` are opened) and its size, checked against the limits per image and for the
whole request before anything is decoded, and every error names its file. The inference process
(`app.ml.model_server`) gets the files as uploaded and decodes them (`app.images.decode_image`); it
loads checkpoints only from paths this module found through the job or the weights registry, never
from the request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.db import release_connection
from app.errors import Conflict
from app.images import Upload, open_image
from app.inference import call_model_server, model_server
from app.jobs import files, stored
from app.jobs.models import Job
from app.jobs.service import get_job
from app.jobs.states import JobStatus
from app.limits import too_large
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU
from app.observability.metrics import record_prediction
from app.prediction.lookups import Found, LookupCache
from app.prediction.schemas import Detection, ImagePrediction, PredictResponse, PredictStats
from app.settings import Settings
from app.storage import open_store
from app.weights import service as weights

logger = logging.getLogger(__name__)

PREDICT_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class Rendered:
    """An image with its detections drawn, for format=image."""

    content: bytes
    media_type: str
    response: PredictResponse


def best_checkpoint(settings: Settings, job: Job) -> Path:
    """The job's best checkpoint as a local file (`app.jobs.stored.local_checkpoint`: its directory's
    with the local store, the store cache's copy with a remote one); 409 when it has none yet."""
    checkpoint = stored.local_checkpoint(settings, job, files.CKPT_BEST)
    if checkpoint is None:
        raise Conflict(f"job {job.id!r} has no best checkpoint yet (status {job.status})")
    return checkpoint


def check_images(uploads: list[Upload], *, max_pixels: int, max_total_pixels: int) -> None:
    """Every upload's format and size, from its header alone (nothing is decoded): 415 or 422 as
    `app.images.open_image` says, 413 when the images together are over `max_total_pixels`."""
    total = 0
    for upload in uploads:
        with open_image(upload, max_pixels=max_pixels) as image:
            width, height = image.size
        total += width * height
    if total > max_total_pixels:
        raise too_large(
            "predict_max_total_pixels",
            max_total_pixels,
            f"the {len(uploads)} images are {total} pixels together, over the limit of {max_total_pixels} "
            "per request (SGJOBS_PREDICT_MAX_TOTAL_PIXELS); send fewer or smaller images per request",
        )


@dataclass(frozen=True)
class Predictor:
    """The checkpoint that predicts and what to call it: a job's best, or registered weights (whose
    file may carry no class names: `class_names` are then used)."""

    model: str
    checkpoint: Path
    job_id: str | None = None
    weights_id: str | None = None
    class_names: list[str] | None = None


def predictor(
    session: Session,
    *,
    settings: Settings,
    job_id: str | None,
    weights_id: str | None,
    scope: str | None,
    lookups: LookupCache | None = None,
) -> Predictor:
    """The job's best checkpoint (404, 409 without one) or the registered weights' file (404, 409
    when it is gone). With `lookups`, a succeeded job's or the weights' found a moment ago (see
    `app.prediction.lookups`), and what is found here is kept there."""
    if weights_id is not None:
        cached = lookups.get("weights", weights_id, scope=scope) if lookups is not None else None
        if cached is not None:
            return cached
        found = weights.get_weights(session, weights_id=weights_id, scope=scope)
        source = Predictor(
            model=found.model,
            checkpoint=weights.existing_file(settings, found),
            weights_id=found.id,
            class_names=found.classes,
        )
        if lookups is not None:
            lookups.put("weights", weights_id, Found(source, found.tenant, weights.SHARED_TENANTS))
        return source
    assert job_id is not None
    cached = lookups.get("job", job_id, scope=scope) if lookups is not None else None
    if cached is not None:
        return cached
    job = get_job(session, job_id=job_id, scope=scope)
    if not open_store(settings).is_local:
        release_connection(session)  # a download from the store may take a while
    source = Predictor(model=job.model, checkpoint=best_checkpoint(settings, job), job_id=job.id)
    # Only a succeeded job's best checkpoint is final: a running one's improves, and a failed or
    # cancelled one may be resumed.
    if lookups is not None and job.status == JobStatus.succeeded:
        lookups.put("job", job_id, Found(source, job.tenant))
    return source


def predict(
    session: Session,
    *,
    settings: Settings,
    scope: str | None,
    job_id: str | None = None,
    weights_id: str | None = None,
    uploads: list[Upload],
    conf: float = DEFAULT_CONF,
    iou: float = DEFAULT_IOU,
    image_format: str | None = None,
    lookups: LookupCache | None = None,
) -> PredictResponse | Rendered:
    """Detections for every upload with the job's best model or the registered weights (one of
    `job_id` and `weights_id`), as one batch (which the inference process may merge with other
    requests' to the same model). With `image_format` ("jpeg" or "png") and one upload, that image
    with its boxes drawn instead. `session` is closed once the checkpoint is found (its connection
    goes back to the pool before the inference wait); with `lookups`, a model found a moment ago is
    not looked up again (`predictor`)."""
    started = time.perf_counter()
    # Every image is checked, from its header, before anything is decoded or looked up: one bad file
    # fails the request, naming it.
    check_images(
        uploads,
        max_pixels=settings.predict_max_image_pixels,
        max_total_pixels=settings.predict_max_total_pixels,
    )
    source = predictor(
        session, settings=settings, job_id=job_id, weights_id=weights_id, scope=scope, lookups=lookups
    )
    # Decoding and inference take seconds; the database has nothing more to say to this request.
    release_connection(session)
    result = call_model_server(
        settings,
        "predict",
        timeout=PREDICT_TIMEOUT_SECONDS,
        model=source.model,
        checkpoint=str(source.checkpoint),
        class_names=source.class_names,
        # Encoded: the inference process decodes them (`app.images.decode_image`).
        uploads=[(u.name, u.data) for u in uploads],
        max_pixels=settings.predict_max_image_pixels,
        conf=conf,
        iou=iou,
        image_format=image_format,
    )
    response = PredictResponse(
        job_id=source.job_id,
        weights_id=source.weights_id,
        model=source.model,
        classes=result["class_names"],
        conf=conf,
        iou=iou,
        images=[
            ImagePrediction(
                file=upload.name,
                width=r["width"],
                height=r["height"],
                detections=[Detection(**d) for d in r["detections"]],
            )
            for upload, r in zip(uploads, result["results"], strict=True)
        ],
        cached=result["cached"],
        model_loads=result["model_loads"],
        inference_ms=round(result["seconds"] * 1000, 2),
        batch_requests=result["batch_requests"],
        backend=result["backend"],
        batch_images=result["batch_images"],
    )
    record_prediction(
        seconds=time.perf_counter() - started, inference_seconds=result["seconds"], cached=result["cached"]
    )
    if image_format is None:
        return response
    rendered: bytes = result["results"][0]["rendered"]
    return Rendered(content=rendered, media_type=f"image/{image_format}", response=response)


def stats(*, settings: Settings) -> PredictStats:
    """The inference process's state; does not start it."""
    server = model_server(settings)
    if server.pid is None:
        return PredictStats(
            running=False,
            pid=None,
            process_starts=server.starts,
            model_loads=0,
            capacity=settings.predict_cache_size,
            cached_models=[],
        )
    result = call_model_server(settings, "stats", timeout=30)
    return PredictStats(running=True, process_starts=server.starts, **result)
