"""A succeeded job's model is exported for onnxruntime by its training and loaded by the API's warmer
before anyone asks: its first /predict finds it held, on the onnxruntime path (the defaults, on a
service of this module's own: the shared test services do not export)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.testing import Backend
from tests.conftest import started_service
from tests.prediction.helpers import encode, scene
from tests.support import Service, make_shapes, tiny_spec
from tests.weights.test_router import upload

pytestmark = pytest.mark.slow  # trains a job (about 30 s on 2 CPU cores)

DATASET = "warm-shapes"


@pytest.fixture(scope="module")
def exporting(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service with the shipped defaults for serving: exported on success, warmed."""
    home = tmp_path_factory.mktemp(f"warm-{backend.name}")
    with started_service(backend, home, serving_export=True, predict_warm=True) as running:
        yield running


def _held(service: Service, checkpoint: str) -> dict[str, Any] | None:
    stats = service.client.get("/predict/stats").json()
    return next((m for m in stats["cached_models"] if m["checkpoint"] == checkpoint), None)


@pytest.mark.backends("sqlite")
def test_a_succeeded_jobs_model_is_loaded_on_onnxruntime_before_its_first_request(exporting: Service) -> None:
    service = exporting
    make_shapes(service.datasets_dir, DATASET, splits=(("train", 16), ("valid", 8)), max_size=112)
    spec = tiny_spec(DATASET, name="warm", input_size=[64, 64], training={"max_epochs": 1, "batch_size": 8})
    job = service.wait(service.submit(spec)["id"], timeout=600)
    assert job["status"] == "succeeded", service.events(job["id"])
    checkpoint = job["artifacts"]["ckpt_best"]
    exported = [e for e in service.events(job["id"]) if e["message"].startswith("exported for serving")]
    assert exported and exported[0]["data"]["serving_onnx"] == "ckpt_best.serving.onnx", exported
    assert (Path(checkpoint).parent / "ckpt_best.serving.onnx").is_file()

    # Nobody has asked for this model yet: the warmer loads it (it polls every half second).
    deadline = time.monotonic() + 60
    while (held := _held(service, checkpoint)) is None:
        assert time.monotonic() < deadline, service.client.get("/predict/stats").json()
        time.sleep(0.2)
    assert held["backend"] == "onnxruntime"
    loads = service.client.get("/predict/stats").json()["model_loads"]

    response = service.client.post(
        "/predict",
        data={"job_id": job["id"], "conf": "0.01"},
        files=[("files", ("first.png", encode(scene(160, 120, seed=3))))],
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["cached"], body["backend"], body["model_loads"]) == (True, "onnxruntime", loads)
    assert [image["file"] for image in body["images"]] == ["first.png"]


@pytest.mark.backends("sqlite")
def test_weights_without_a_serving_export_are_served_by_pytorch(service: Service, standins: Path) -> None:
    weights = upload(service, standins / "s5_named.pth")
    assert weights.status_code in (200, 201), weights.text
    response = service.client.post(
        "/predict",
        data={"weights_id": weights.json()["id"]},
        files=[("files", ("a.png", encode(scene(64, 64, seed=1))))],
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert response.json()["backend"] == "pytorch"
