"""/predict and ONNX export with registered weights: a pretrained detector answers before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.prediction.helpers import encode, scene, trained_job
from tests.support import Service
from tests.weights.test_router import upload

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


def _predict(service: Service, image: bytes, **fields: str) -> httpx.Response:
    return service.client.post(
        "/predict", data=fields, files=[("files", ("scene.png", image, "image/png"))], timeout=300
    )


@pytest.fixture(scope="module")
def promoted(service: Service) -> dict[str, Any]:
    """The shared trained job's best checkpoint, registered as weights."""
    response = service.client.post("/weights", json={"from_job": trained_job(service)["id"]}, timeout=300)
    assert response.status_code in (200, 201), response.text
    weights: dict[str, Any] = response.json()
    return weights


def test_pretrained_coco_weights_predict_with_coco_names(service: Service, standins: Path) -> None:
    weights = upload(service, standins / "yolo_nas_s_coco.pth").json()
    response = _predict(service, encode(scene(160, 120)), weights_id=weights["id"], conf="0.0")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["weights_id"] == weights["id"] and body["job_id"] is None
    assert body["model"] == "yolo_nas_s"
    assert body["classes"] == weights["classes"] and body["classes"][:2] == ["person", "bicycle"]
    detections = body["images"][0]["detections"]
    assert detections, "an untrained head still scores boxes above 0"
    assert all(d["class_name"] == body["classes"][d["class_id"]] for d in detections)


def test_promoted_weights_predict_as_their_job_does(service: Service, promoted: dict[str, Any]) -> None:
    image = encode(scene(128, 96, seed=3))
    by_job = _predict(service, image, job_id=promoted["job_id"] or trained_job(service)["id"], conf="0.01")
    by_weights = _predict(service, image, weights_id=promoted["id"], conf="0.01")
    assert by_job.status_code == by_weights.status_code == 200, by_weights.text
    assert by_weights.json()["classes"] == ["circle", "square", "triangle"]
    boxes = [
        [round(x, 1) for x in d["box"]] + [d["class_id"]] for d in by_job.json()["images"][0]["detections"]
    ]
    same = [
        [round(x, 1) for x in d["box"]] + [d["class_id"]]
        for d in by_weights.json()["images"][0]["detections"]
    ]
    assert same == boxes


def test_predict_needs_exactly_one_source(service: Service, promoted: dict[str, Any]) -> None:
    image = encode(scene(64, 64))
    for fields in ({}, {"job_id": "a", "weights_id": promoted["id"]}):
        response = _predict(service, image, **fields)
        assert response.status_code == 422, fields
        assert "exactly one" in response.json()["detail"]
    assert _predict(service, image, weights_id="no-such-weights").status_code == 404


def test_export_weights_to_onnx(service: Service, promoted: dict[str, Any]) -> None:
    response = service.client.post(f"/weights/{promoted['id']}/export", timeout=600)
    assert response.status_code == 200, response.text
    export = response.json()
    assert export["weights_id"] == promoted["id"] and export["job_id"] is None
    assert export["classes"] == ["circle", "square", "triangle"] and export["input_shape"] == [1, 3, 64, 64]
    onnx = service.client.get(export["artifact"]["url"], timeout=300)
    assert onnx.status_code == 200 and len(onnx.content) == export["artifact"]["size"]
    again = service.client.post(f"/weights/{promoted['id']}/export", timeout=600).json()
    assert again["cached"] is True
    checkpoint = service.client.get(f"/weights/{promoted['id']}/artifacts/weights.pth", timeout=300)
    assert checkpoint.status_code == 200 and len(checkpoint.content) == promoted["size_bytes"]
    assert service.client.get(f"/weights/{promoted['id']}/artifacts/other.txt").status_code == 404
    assert service.client.post("/weights/no-such-weights/export").status_code == 404
