"""Jobs that start from registered or published weights (both backends): what POST /jobs refuses,
what a job says it started from, the weights it uses kept from deletion, and real fine-tuning runs."""

from __future__ import annotations

import hashlib
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.db import session_scope, utcnow
from app.jobs import service as jobs
from app.jobs.models import Job
from app.jobs.schemas import JobSpec
from app.settings import Settings
from app.weights import service as weights
from tests.prediction.helpers import trained_job
from tests.support import ADMIN, Service, make_shapes, tiny_spec
from tests.weights.test_router import upload


@pytest.fixture(scope="module")
def dataset(service: Service) -> str:
    make_shapes(service.datasets_dir, "weights-init", splits=(("train", 4), ("valid", 2)))
    return "weights-init"


@pytest.fixture(scope="module")
def s5(service: Service, standins: Path) -> dict[str, Any]:
    """Registered 5-class YOLO-NAS-S weights."""
    response = upload(service, standins / "s5_named.pth")
    assert response.status_code in (200, 201), response.text
    weights: dict[str, Any] = response.json()
    return weights


def _locs(response: Any) -> list[list[Any]]:
    return [e["loc"] for e in response.json()["errors"]]


def test_init_from_takes_exactly_one_source(service: Service, dataset: str) -> None:
    for init in ({}, {"job_id": "a", "weights_id": "b"}, {"weights_id": "b", "pretrained": "coco"}):
        response = service.post_job(tiny_spec(dataset, init_from=init))
        assert response.status_code == 422, init
        assert "exactly one" in response.json()["detail"]
    response = service.post_job(tiny_spec(dataset, init_from={"pretrained": "imagenet"}))
    assert response.status_code == 422 and _locs(response)[0][:3] == ["body", "init_from", "pretrained"]


def test_unknown_weights_are_422(service: Service, dataset: str) -> None:
    response = service.post_job(tiny_spec(dataset, init_from={"weights_id": "no-such-weights"}))
    assert response.status_code == 422
    assert _locs(response) == [["body", "init_from", "weights_id"]]


def test_weights_of_another_model_are_422(service: Service, dataset: str, s5: dict[str, Any]) -> None:
    response = service.post_job(tiny_spec(dataset, model="yolo_nas_m", init_from={"weights_id": s5["id"]}))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "yolo_nas_s" in detail and "yolo_nas_m" in detail


def test_registered_weights_whose_file_is_gone_are_422(
    service: Service, dataset: str, s5: dict[str, Any]
) -> None:
    path = weights.weights_file(Settings(home=service.home), s5["id"])
    hidden = path.with_name(path.name + ".hidden")
    path.rename(hidden)
    try:
        response = service.post_job(tiny_spec(dataset, init_from={"weights_id": s5["id"]}))
    finally:
        hidden.rename(path)
    assert response.status_code == 422, response.text
    assert f"the file of weights {s5['id']!r} is missing" in response.json()["detail"]
    assert _locs(response) == [["body", "init_from", "weights_id"]]


def test_pretrained_without_its_file_is_422_naming_the_file_and_the_folder(
    service: Service, dataset: str
) -> None:
    # YOLO-NAS-L: no test puts its published file in the folder.
    response = service.post_job(tiny_spec(dataset, model="yolo_nas_l", init_from={"pretrained": "coco"}))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "yolo_nas_l_coco.pth" in detail and str(service.home / "weights") in detail
    assert _locs(response) == [["body", "init_from", "pretrained"]]


def test_weights_are_kept_while_a_queued_job_starts_from_them(
    service: Service, service_settings: Settings, dataset: str, s5: dict[str, Any]
) -> None:
    with session_scope(service_settings.database_url) as session:
        spec = JobSpec.model_validate(tiny_spec(dataset, init_from={"weights_id": s5["id"]}))
        job = jobs.create_job(session, spec=spec, settings=service_settings, principal=ADMIN)
        # Never sent to the worker (and never re-sent by the sweeper): it stays queued.
        session.execute(update(Job).where(Job.id == job.id).values(enqueued_at=utcnow() + timedelta(days=1)))
        job_id = job.id
    queued = service.job(job_id)
    assert queued["started_from"] == {
        "weights_id": s5["id"],
        "name": s5["name"],
        "sha256": s5["sha256"],
        "num_classes": 5,
        "job_id": None,
        "pretrained": None,
        "checkpoint": None,
    }
    response = service.client.delete(f"/weights/{s5['id']}")
    assert response.status_code == 409, response.text
    assert response.json()["job_ids"] == [job_id]
    service.client.post(f"/jobs/{job_id}/cancel")
    assert service.client.get(f"/weights/{s5['id']}").status_code == 200


@pytest.mark.slow
def test_fine_tune_from_promoted_weights_on_other_classes(service: Service) -> None:
    source = trained_job(service)
    weights = service.client.post("/weights", json={"from_job": source["id"]}, timeout=300).json()
    make_shapes(
        service.datasets_dir,
        "weights-other-classes",
        classes=("cross", "circle"),
        splits=(("train", 8), ("valid", 4)),
        seed=4,
        max_size=112,
    )
    job = service.submit(tiny_spec("weights-other-classes", init_from={"weights_id": weights["id"]}))
    assert job["started_from"]["weights_id"] == weights["id"] and job["started_from"]["num_classes"] == 3
    done = service.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", service.events(job["id"])
    assert done["classes"] == ["cross", "circle"]
    assert done["started_from"]["checkpoint"] == f"{weights['id']}.pth"
    messages = [e["message"] for e in service.events(job["id"])]
    assert any("re-initialised for 2 classes" in m and weights["id"] in m for m in messages), messages


@pytest.mark.slow
def test_pretrained_coco_from_the_weights_folder(service: Service, standins: Path, dataset: str) -> None:
    source = standins / "yolo_nas_s_coco.pth"
    folder = service.home / "weights"
    shutil.copy(source, folder / "yolo_nas_s_coco.pth")
    job = service.submit(tiny_spec(dataset, init_from={"pretrained": "coco"}))
    started = job["started_from"]
    assert started["pretrained"] == "coco" and started["num_classes"] == 80
    assert started["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    weights = service.client.get(f"/weights/{started['weights_id']}").json()
    assert weights["classes"][:2] == ["person", "bicycle"]
    # Registered once: asking again finds the same weights (cancelled at once: one training is enough).
    again = service.submit(tiny_spec(dataset, init_from={"pretrained": "coco"}))
    service.client.post(f"/jobs/{again['id']}/cancel")
    assert again["started_from"] == started
    done = service.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", service.events(job["id"])
    assert done["classes"] == ["circle", "square", "triangle"]
    assert done["started_from"]["checkpoint"] == f"{weights['id']}.pth"
