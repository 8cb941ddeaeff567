"""Typed helpers that build test data and talk to a running service."""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import update

from app.auth.models import Role
from app.auth.principal import DEFAULT_TENANT, Principal
from app.datasets.demo import ShapesSpec, write_shapes_dataset
from app.db import session_scope, utcnow
from app.jobs import service as jobs
from app.jobs.models import Job
from app.jobs.schemas import JobSpec
from app.settings import Settings

TERMINAL = ("succeeded", "failed", "cancelled")
# Who tests act as when they call services directly: an admin of the default tenant, like the
# service's own admin key.
ADMIN = Principal(key_id="tests", tenant=DEFAULT_TENANT, role=Role.admin)
# The default of the setting, for tests that call the dataset functions directly.
ANNOTATION_MAX_BYTES: int = Settings.model_fields["annotation_max_bytes"].default


@dataclass
class Service:
    """A running `sgjobs serve` (API + real Celery worker) and an HTTP client for it."""

    backend: str
    base_url: str
    home: Path
    datasets_dir: Path
    log_file: Path
    client: httpx.Client = field(repr=False)
    # The service's admin key (the client sends it); tests that make clients of their own use `headers`.
    admin_key: str = field(repr=False, default="")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def post_job(self, spec: dict[str, Any]) -> httpx.Response:
        return self.client.post("/jobs", json=spec)

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        response = self.post_job(spec)
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def wait(self, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 600) -> dict[str, Any]:
        """Poll until the job reaches one of `statuses`; fails with the job's events on timeout."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while job["status"] not in statuses:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck in {job['status']}; events: {self.events(job_id)}")
            time.sleep(0.2)
            job = self.job(job_id)
        return job

    def wait_until(self, job_id: str, predicate: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                raise AssertionError(f"condition never held for job {job_id}: {job}")
            time.sleep(0.1)

    def metrics(self, job_id: str, **params: Any) -> list[dict[str, Any]]:
        """All metric points, following the cursor."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = dict(params, limit=5000)
            if cursor:
                query["cursor"] = cursor
            page = self.client.get(f"/jobs/{job_id}/metrics", params=query).json()
            items.extend(page["items"])
            if not page["items"]:
                return items
            cursor = page["next_cursor"]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.client.get(
            f"/jobs/{job_id}/events", params={"limit": 5000}
        ).json()["items"]
        return events


def make_shapes(datasets_dir: Path, name: str, **spec: Any) -> Path:
    """A generated Roboflow-layout COCO dataset of drawn shapes under the datasets directory."""
    return write_shapes_dataset(datasets_dir / name, ShapesSpec(**spec))


def make_unreadable_dataset(datasets_dir: Path, name: str) -> str:
    """A dataset folder that passes POST /jobs' layout check but whose training annotations cannot
    be read: a job on it is claimed and fails at the worker's dataset check in seconds, never
    training. Returns its path relative to the datasets directory."""
    root = make_shapes(datasets_dir, name, splits=(("train", 3), ("valid", 2)))
    (root / "train" / "_annotations.coco.json").write_text("[]")
    return name


def insert_job(settings: Settings, dataset: str, *, spec: dict[str, Any] | None = None, **values: Any) -> str:
    """A job created as POST /jobs creates it (without sending it), then moved to the state `values`
    give (columns of `jobs`). A running one is attempt 1 of a worker holding a day-long lease unless
    `values` say otherwise, as a claim leaves it, so no sweeper takes it for a lost attempt."""
    if values.get("status") == "running":
        values = {
            "attempt": 1,
            "worker": "test-worker",
            "lease_expires_at": utcnow() + timedelta(days=1),
            **values,
        }
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(
            session,
            spec=JobSpec.model_validate(spec or tiny_spec(dataset)),
            settings=settings,
            principal=ADMIN,
        )
        if values:
            session.execute(update(Job).where(Job.id == job.id).values(**values))
        return job.id


def zip_folder(folder: Path, wrap: str | None = None) -> bytes:
    """A zip archive of the files under `folder` (inside one top-level folder `wrap`, if given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                archive.write(path, f"{wrap}/{name}" if wrap else name)
    return buffer.getvalue()


def load_annotations(root: Path, split: str = "train") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / split / "_annotations.coco.json").read_text())
    return data


def save_annotations(root: Path, data: dict[str, Any], split: str = "train") -> None:
    (root / split / "_annotations.coco.json").write_text(json.dumps(data))


def tiny_spec(path: str, **overrides: Any) -> dict[str, Any]:
    """A job spec that trains in seconds on the CPU."""
    training = {"max_epochs": 1, "batch_size": 8, "lr_warmup_epochs": 0, "average_best_models": True}
    training.update(overrides.pop("training", {}))
    spec: dict[str, Any] = {
        "name": f"test-{path}",
        "model": "yolo_nas_s",
        "dataset": {"format": "coco", "path": path},
        "input_size": [64, 64],
        "training": training,
    }
    spec.update(overrides)
    return spec
