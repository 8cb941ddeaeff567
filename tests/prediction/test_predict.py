"""POST /predict end to end: a model trained through the API answers images through the inference process.

One tiny job is trained (shared with the artifacts tests); each test sends real multipart requests
to a running `sgjobs serve`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from app.errors import PayloadTooLarge
from app.ml.sg_setup import child_environment
from app.prediction.router import _read_form
from app.settings import Settings
from tests.prediction.helpers import encode, job_without_checkpoint, scene, trained_job
from tests.support import Service

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(service: Service) -> dict[str, Any]:
    return trained_job(service)


def _predict(service: Service, job_id: str, files: list[tuple[str, bytes]], **fields: str) -> httpx.Response:
    return service.client.post(
        "/predict",
        data={"job_id": job_id, **fields},
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        timeout=300,
    )


def _reference(checkpoint: str, image_path: Path, conf: float, iou: float) -> list[dict[str, Any]]:
    """super-gradients' own `model.predict` on the same image, in a process of its own (SG's import
    rewires stdout and logging)."""
    code = f"""
import json, os, sys
import numpy as np
from PIL import Image
from app.ml.inference import load_model
model, names = load_model("yolo_nas_s", __import__("pathlib").Path({checkpoint!r}))
image = np.asarray(Image.open({str(image_path)!r}).convert("RGB"))
p = model.predict(image, conf={conf}, iou={iou}, fuse_model=False, fp16=False).prediction
h, w = image.shape[:2]
boxes = np.asarray(p.bboxes_xyxy, dtype=float).reshape(-1, 4)
boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w); boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
rows = zip(boxes, p.confidence, p.labels)
out = [{{"box": b.tolist(), "score": float(s), "class_id": int(c)}} for b, s, c in rows]
sys.__stdout__.write("RESULT" + json.dumps(out) + "\\n")
"""
    env = child_environment(image_path.parent / "sg_logs", console_level="ERROR")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stderr[-3000:]
    result: list[dict[str, Any]] = json.loads(line.removeprefix("RESULT"))
    return result


def test_one_non_square_image_gets_boxes_in_its_own_pixels(
    service: Service, job: dict[str, Any], tmp_path: Path
) -> None:
    # 320x200: neither square nor the 64x64 training input.
    image = scene(320, 200, seed=1)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(image))
    response = _predict(service, job["id"], [("scene.png", path.read_bytes())], conf="0.01", iou="0.6")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["classes"] == ["circle", "square", "triangle"] == job["classes"]
    assert (body["conf"], body["iou"]) == (0.01, 0.6)
    [result] = body["images"]
    assert (result["file"], result["width"], result["height"]) == ("scene.png", 320, 200)
    detections = result["detections"]
    assert detections, "conf=0.01 leaves boxes even for a barely trained model"
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 200
        assert 0.01 <= det["score"] <= 1
        assert body["classes"][det["class_id"]] == det["class_name"]
    # Boxes span the original image, not the 64 px model input...
    assert max(d["box"][2] for d in detections) > 64
    # ...and are what super-gradients' own predict answers for the same image.
    reference = _reference(job["artifacts"]["ckpt_best"], path, conf=0.01, iou=0.6)
    ours = sorted((d["class_id"], *np.round(d["box"], 0)) for d in detections)
    theirs = sorted((d["class_id"], *np.round(d["box"], 0)) for d in reference)
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2.0)


def test_a_batch_of_images_answers_each_in_order(service: Service, job: dict[str, Any]) -> None:
    sizes = [(320, 240), (96, 300), (500, 120), (64, 64)]
    files = [(f"img{i}.jpg", encode(scene(w, h, seed=i), "JPEG")) for i, (w, h) in enumerate(sizes)]
    response = _predict(service, job["id"], files, conf="0.05")
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [(i["file"], i["width"], i["height"]) for i in images] == [
        (f"img{i}.jpg", w, h) for i, (w, h) in enumerate(sizes)
    ]
    for image in images:
        assert all(
            0 <= d["box"][2] <= image["width"] and 0 <= d["box"][3] <= image["height"]
            for d in image["detections"]
        )
        assert all(d["score"] >= 0.05 for d in image["detections"])


def test_the_second_request_does_not_reload_the_model(service: Service, job: dict[str, Any]) -> None:
    files = [("a.png", encode(scene(200, 150)))]
    first = _predict(service, job["id"], files)
    assert first.status_code == 200, first.text
    loads = service.client.get("/predict/stats").json()["model_loads"]
    second = _predict(service, job["id"], files)
    assert second.status_code == 200, second.text
    assert second.json()["cached"] is True
    assert second.json()["model_loads"] == loads
    stats = service.client.get("/predict/stats").json()
    assert stats["running"] is True and stats["model_loads"] == loads
    # Most recently used last (other tests' models may be held too).
    assert stats["cached_models"][-1]["checkpoint"] == job["artifacts"]["ckpt_best"]


@pytest.mark.parametrize(
    ("fields", "headers", "media_type", "pil_format"),
    [
        ({}, {}, "image/jpeg", "JPEG"),
        ({"image_format": "png"}, {}, "image/png", "PNG"),
        ({}, {"accept": "image/png"}, "image/png", "PNG"),
    ],
)
def test_format_image_returns_the_drawn_image_at_its_original_size(
    service: Service,
    job: dict[str, Any],
    fields: dict[str, str],
    headers: dict[str, str],
    media_type: str,
    pil_format: str,
) -> None:
    response = service.client.post(
        "/predict",
        data={"job_id": job["id"], "format": "image", "conf": "0.01", **fields},
        files=[("files", ("wide.png", encode(scene(330, 170)), "image/png"))],
        headers=headers,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    drawn = Image.open(io.BytesIO(response.content))
    drawn.load()
    assert drawn.format == pil_format and drawn.size == (330, 170)
    assert int(response.headers["x-detections"]) > 0


def _bomb() -> bytes:
    # 60 megapixels of one colour: a few kilobytes compressed, 180 MB decoded.
    return encode(Image.new("L", (10_000, 6_000)))


def test_bad_input_gets_its_status_and_names_the_file(
    service: Service, job: dict[str, Any], service_settings: Settings
) -> None:
    good = ("good.png", encode(scene(120, 90)))
    png = good[1]
    cases: list[tuple[str, httpx.Response, int | set[int], str | None]] = [
        ("unknown job", _predict(service, "0" * 32, [good]), 404, None),
        ("no checkpoint", _predict(service, job_without_checkpoint(service_settings), [good]), 409, None),
        (
            "not an image",
            _predict(service, job["id"], [good, ("notes.txt", b"just some text")]),
            415,
            "notes.txt",
        ),
        ("empty file", _predict(service, job["id"], [("empty.jpg", b"")]), 415, "empty.jpg"),
        ("truncated", _predict(service, job["id"], [("cut.png", png[: len(png) // 2])]), 422, "cut.png"),
        (
            "corrupt",
            _predict(service, job["id"], [("bad.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 200)]),
            {415, 422},
            "bad.jpg",
        ),
        ("bomb", _predict(service, job["id"], [("bomb.png", _bomb())]), 422, "bomb.png"),
        ("too many", _predict(service, job["id"], [(f"{i}.png", png) for i in range(33)]), 413, None),
        ("conf > 1", _predict(service, job["id"], [good], conf="1.5"), 422, "conf"),
        ("iou not a number", _predict(service, job["id"], [good], iou="high"), 422, "iou"),
        ("empty conf", _predict(service, job["id"], [good], conf=""), 422, "conf"),
        ("empty weights id", _predict(service, job["id"], [good], weights_id=""), 422, "weights_id"),
        ("bad format", _predict(service, job["id"], [good], format="svg"), 422, "format"),
        ("image of two", _predict(service, job["id"], [good, good], format="image"), 422, "format"),
        ("no job id", service.client.post("/predict", files=[("files", good)]), 422, "job_id"),
        ("no files", service.client.post("/predict", files={"job_id": (None, job["id"])}), 422, "files"),
        ("not multipart", service.client.post("/predict", json={"job_id": job["id"]}), 415, None),
    ]
    for name, response, status, mentioned in cases:
        expected = status if isinstance(status, set) else {status}
        assert response.status_code in expected, (name, response.text)
        if mentioned:
            assert mentioned in response.json()["detail"], (name, response.text)
    # None of it hurt the service.
    assert service.client.get("/healthz").status_code == 200
    assert _predict(service, job["id"], [good]).status_code == 200


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(
    service: Service, job: dict[str, Any]
) -> None:
    # Raw HTTP: announce 1 GB, send only the headers; the answer must come without the body.
    url = urlparse(service.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Authorization: Bearer {service.admin_key}\r\n".encode()
            + b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n"
        )
        answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer


def test_a_streamed_body_is_cut_off_at_the_limit(backend: object) -> None:
    # Chunked uploads carry no Content-Length: the limit holds while reading.
    settings = Settings(predict_max_request_bytes=1024)
    chunks = [b"--b\r\n" + b"x" * 600] * 4
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=b"),
            (b"transfer-encoding", b"chunked"),
        ],
    }
    import asyncio

    with pytest.raises(PayloadTooLarge):
        asyncio.run(_read_form(Request(scope, receive), settings))
    assert len(messages) < 3  # it stopped reading


def test_jobs_answer_while_the_inference_process_restarts(service: Service, job: dict[str, Any]) -> None:
    """A dead inference process is replaced on the next request; the API stays responsive meanwhile."""
    stats = service.client.get("/predict/stats").json()
    if stats["running"]:
        os.kill(stats["pid"], signal.SIGKILL)
        # A request racing the death gets a 503 (never a 500); wait until it is surely gone.
        time.sleep(1.0)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: result.update(r=_predict(service, job["id"], [("a.png", encode(scene(160, 120)))]))
    )
    thread.start()
    time.sleep(0.05)
    latencies = []
    while thread.is_alive() and len(latencies) < 20:
        start = time.perf_counter()
        assert service.client.get("/jobs", params={"limit": 5}).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.1)
    thread.join(timeout=300)
    assert latencies, "the cold predict finished before GET /jobs was tried"
    assert max(latencies) < 2.0, latencies  # generous: others load this machine too
    response = result["r"]
    assert response.status_code == 200, response.text
    assert response.json()["cached"] is False  # a fresh process loaded the model again
    after = service.client.get("/predict/stats").json()
    assert after["process_starts"] == stats["process_starts"] + 1
    assert after["pid"] != stats["pid"]


def test_the_document_states_the_image_count_limit(service: Service) -> None:
    schema = service.client.get("/openapi.json").json()
    form = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    files = form["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, Settings().predict_max_images)
