"""One tiny trained job per test session, shared by the prediction and artifacts tests."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import service as jobs
from app.jobs.models import Job
from app.jobs.schemas import JobSpec
from app.settings import Settings
from tests.support import ADMIN, Service, make_shapes, tiny_spec

DATASET = "serve-shapes"
INPUT_SIZE = 64
_trained: dict[str, dict[str, Any]] = {}


def trained_job(service: Service) -> dict[str, Any]:
    """A succeeded job trained through the API (16 images, 64 px, 2 epochs), trained once per service."""
    if service.base_url not in _trained:
        make_shapes(service.datasets_dir, DATASET, splits=(("train", 16), ("valid", 8)), max_size=112)
        spec = tiny_spec(
            DATASET,
            name="serve",
            input_size=[INPUT_SIZE, INPUT_SIZE],
            training={"max_epochs": 2, "batch_size": 8, "average_best_models": True},
        )
        job = service.wait(service.submit(spec)["id"], timeout=600)
        assert job["status"] == "succeeded", service.events(job["id"])
        _trained[service.base_url] = job
    return _trained[service.base_url]


def job_without_checkpoint(settings: Settings) -> str:
    """A queued job that never runs (marked as sent long from now, so no sweeper re-sends it)."""
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(
            session, principal=ADMIN, spec=JobSpec.model_validate(tiny_spec(DATASET)), settings=settings
        )
        session.execute(update(Job).where(Job.id == job.id).values(enqueued_at=utcnow() + timedelta(days=1)))
        return job.id


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    """`image` as file bytes."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt)
    return buffer.getvalue()


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A grey image with a few filled shapes, like the training data."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        size = int(rng.integers(min(width, height) // 6, min(width, height) // 2))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + size, y + size), fill=colour)
        else:
            draw.rectangle((x, y, x + size, y + size), fill=colour)
    return np.asarray(image)
