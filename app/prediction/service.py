"""Prediction: find a job's best checkpoint (or registered weights), check and decode the uploads, ask
the inference process.

The images are checked and decoded here, in the API process, with PIL: every image's header is read
first, for its format (only `IMAGE_FORMATS` are opened) and its size, which is checked against the
limits per image and for the whole request before anything is decoded (decompression bombs: a few
MB of PNG can decode to gigabytes), and every error names its file. Only decoded RGB arrays reach
the inference process (`app.ml.model_server`), which loads checkpoints only from paths this module
found through the job or the weights registry, never from the request.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.datasets.pipeline import TRAINABLE_FORMATS
from app.db import release_connection
from app.errors import AppError, Conflict, InvalidInput, UnsupportedMediaType
from app.inference import call_model_server, model_server
from app.jobs import files, stored
from app.jobs.models import Job
from app.jobs.service import get_job
from app.limits import too_large
from app.ml.types import DEFAULT_CONF, DEFAULT_IOU
from app.observability.metrics import record_prediction
from app.prediction.schemas import Detection, ImagePrediction, PredictResponse, PredictStats
from app.settings import Settings
from app.storage import open_store
from app.weights import service as weights

logger = logging.getLogger(__name__)

PREDICT_TIMEOUT_SECONDS = 300.0
# The PIL formats /predict opens: those the service trains on. Any other is never handed to a decoder.
# MPO (a phone camera's JPEG) is opened by PIL's JPEG opener, which has no opener of its own.
IMAGE_FORMATS: tuple[str, ...] = tuple(sorted(TRAINABLE_FORMATS - {"MPO"}))
IMAGE_FORMATS_TEXT = ", ".join(IMAGE_FORMATS)


@dataclass(frozen=True)
class Upload:
    """One uploaded file, read into memory (the request size limit bounds it)."""

    name: str
    data: bytes


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


def _open(upload: Upload, *, max_pixels: int) -> Any:
    """`upload` opened by PIL, its header read but nothing decoded; 415 for a format not in
    IMAGE_FORMATS, 422 for an image over `max_pixels` or a header that does not parse."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit raises) for big images; our limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(upload.data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"{upload.name}: not an image in a format the service reads ({IMAGE_FORMATS_TEXT})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{upload.name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{upload.name}: the image header cannot be read ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InvalidInput(
            f"{upload.name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
            "(SGJOBS_PREDICT_MAX_IMAGE_PIXELS)"
        )
    return image


def check_images(uploads: list[Upload], *, max_pixels: int, max_total_pixels: int) -> None:
    """Every upload's format and size, from its header alone (nothing is decoded): 415 or 422 as
    `decode_image` says, 413 when the images together are over `max_total_pixels`."""
    total = 0
    for upload in uploads:
        with _open(upload, max_pixels=max_pixels) as image:
            width, height = image.size
        total += width * height
    if total > max_total_pixels:
        raise too_large(
            "predict_max_total_pixels",
            max_total_pixels,
            f"the {len(uploads)} images are {total} pixels together, over the limit of {max_total_pixels} "
            "per request (SGJOBS_PREDICT_MAX_TOTAL_PIXELS); send fewer or smaller images per request",
        )


def decode_image(upload: Upload, *, max_pixels: int) -> np.ndarray:
    """HWC RGB uint8 pixels of `upload`, EXIF orientation applied.

    415 when the bytes are not an image in one of IMAGE_FORMATS; 422 when the image is over the pixel
    limit (checked from the header, before decoding) or cannot be decoded (truncated, corrupt).
    """
    from PIL import Image, ImageOps

    with _open(upload, max_pixels=max_pixels) as image:
        try:
            image.load()  # decodes: a truncated or corrupt file fails here
            # In place, and converted only when not RGB already: each would otherwise copy the pixels.
            ImageOps.exif_transpose(image, in_place=True)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
        except AppError:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidInput(f"{upload.name}: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # What PIL raises for truncated data, broken headers and unsupported modes.
            raise InvalidInput(f"{upload.name}: the image cannot be decoded ({exc})") from exc


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
    session: Session, *, settings: Settings, job_id: str | None, weights_id: str | None, scope: str | None
) -> Predictor:
    """The job's best checkpoint (404, 409 without one) or the registered weights' file (404, 409
    when it is gone)."""
    if weights_id is not None:
        found = weights.get_weights(session, weights_id=weights_id, scope=scope)
        return Predictor(
            model=found.model,
            checkpoint=weights.existing_file(settings, found),
            weights_id=found.id,
            class_names=found.classes,
        )
    assert job_id is not None
    job = get_job(session, job_id=job_id, scope=scope)
    if not open_store(settings).is_local:
        release_connection(session)  # a download from the store may take a while
    return Predictor(model=job.model, checkpoint=best_checkpoint(settings, job), job_id=job.id)


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
) -> PredictResponse | Rendered:
    """Detections for every upload with the job's best model or the registered weights (one of
    `job_id` and `weights_id`), as one batch (which the inference process may merge with other
    requests' to the same model). With `image_format` ("jpeg" or "png") and one upload, that image
    with its boxes drawn instead. `session` is closed once the checkpoint is found (its connection
    goes back to the pool before the inference wait)."""
    started = time.perf_counter()
    # Every image is checked, from its header, before anything is decoded or looked up: one bad file
    # fails the request, naming it.
    check_images(
        uploads,
        max_pixels=settings.predict_max_image_pixels,
        max_total_pixels=settings.predict_max_total_pixels,
    )
    source = predictor(session, settings=settings, job_id=job_id, weights_id=weights_id, scope=scope)
    # Decoding and inference take seconds; the database has nothing more to say to this request.
    release_connection(session)
    images = [decode_image(u, max_pixels=settings.predict_max_image_pixels) for u in uploads]
    result = call_model_server(
        settings,
        "predict",
        timeout=PREDICT_TIMEOUT_SECONDS,
        model=source.model,
        checkpoint=str(source.checkpoint),
        class_names=source.class_names,
        images=images,
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
