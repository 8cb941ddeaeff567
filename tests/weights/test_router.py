"""Weights through the real service (both backends): upload, the layouts SG reads, dedupe by hash,
promotion of a job's checkpoint, list/get/delete, and every kind of bad file refused with nothing left."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.prediction.helpers import job_without_checkpoint, trained_job
from tests.support import Service
from tests.weights.standins import CANARY, FIVE_CLASSES

COCO_FIRST = ["person", "bicycle", "car"]


def upload(service: Service, path: Path, filename: str | None = None, **fields: str) -> httpx.Response:
    with open(path, "rb") as file:
        return service.client.post(
            "/weights",
            files={"file": (filename or path.name, file, "application/octet-stream")},
            data=fields,
            timeout=300,
        )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk(service: Service) -> set[str]:
    """Every file under the weights folder, relative to it."""
    root = service.home / "weights"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_upload_registers_the_seed_layout_with_coco_names(service: Service, standins: Path) -> None:
    path = standins / "yolo_nas_s_coco.pth"
    response = upload(service, path)
    assert response.status_code in (200, 201), response.text  # another test may have sent it first
    weights = response.json()
    assert weights["name"] == "yolo_nas_s_coco.pth" or response.status_code == 200
    assert weights["model"] == "yolo_nas_s" and weights["num_classes"] == 80
    assert weights["classes"][:3] == COCO_FIRST and len(weights["classes"]) == 80
    assert weights["sha256"] == sha256(path) and weights["size_bytes"] == path.stat().st_size
    assert f"store/{weights['id']}.pth" in disk(service)
    assert service.client.get(f"/weights/{weights['id']}").json() == weights
    listed = service.client.get("/weights", params={"limit": 200}).json()
    assert weights["id"] in [w["id"] for w in listed["items"]] and listed["total"] >= 1

    # The same file again (under another name) is the same weights: 200, nothing stored twice.
    files_before = disk(service)
    again = upload(service, path, filename="copy.pth", name="another name")
    assert again.status_code == 200, again.text
    assert again.json() == weights
    assert disk(service) == files_before


@pytest.mark.parametrize(
    ("file", "classes"),
    [("s80_ema.pth", COCO_FIRST), ("s80_bare.pth", COCO_FIRST), ("s5_named.pth", FIVE_CLASSES[:3])],
)
def test_every_layout_sg_reads_is_accepted(
    service: Service, standins: Path, file: str, classes: list[str]
) -> None:
    response = upload(service, standins / file, name=f"layout {file}", model="yolo_nas_s")
    assert response.status_code in (200, 201), response.text
    weights = response.json()
    assert weights["model"] == "yolo_nas_s" and weights["classes"][:3] == classes
    assert weights["num_classes"] == len(weights["classes"])


def test_the_raw_file_as_the_body(service: Service, standins: Path) -> None:
    response = service.client.post(
        "/weights",
        content=(standins / "s80_bare.pth").read_bytes(),
        headers={"content-type": "application/octet-stream"},
        params={"name": "raw", "model": "yolo_nas_s"},
        timeout=300,
    )
    assert response.status_code in (200, 201), response.text
    assert response.json()["sha256"] == sha256(standins / "s80_bare.pth")
    wrong = service.client.post(
        "/weights", content=b"x", headers={"content-type": "application/octet-stream"}, params={"model": "m"}
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["loc"] == ["query", "model"]


def test_a_model_that_disagrees_is_422_naming_both(service: Service, standins: Path) -> None:
    before = disk(service)
    response = upload(service, standins / "s5_named.pth", model="yolo_nas_m")
    assert response.status_code == 422, response.text
    problem = response.json()
    assert "yolo_nas_s" in problem["detail"] and "yolo_nas_m" in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", "model"]
    assert disk(service) <= before


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("text.pth", "not a PyTorch checkpoint"),
        ("truncated.pth", "truncated or corrupt"),
        ("yolox_n.pth", "not a YOLO-NAS checkpoint"),
        ("evil.pth", "posix.system"),
        ("evil.pkl", "posix.system"),
    ],
)
def test_bad_files_are_422_with_a_reason_and_leave_nothing(
    service: Service, standins: Path, file: str, reason: str
) -> None:
    canary = standins / CANARY
    assert not canary.exists()
    before = disk(service)
    total = service.client.get("/weights").json()["total"]
    response = upload(service, standins / file)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"], response.json()
    assert not canary.exists(), "the pickle's payload ran"
    assert disk(service) <= before  # nothing staged or stored is left
    assert service.client.get("/weights").json()["total"] == total


def test_a_refused_model_field_is_422_before_inspection(service: Service, standins: Path) -> None:
    response = upload(service, standins / "text.pth", model="resnet18")
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "model"]


def test_size_limit_is_413_before_reading(service: Service) -> None:
    # The declared length is over weights_max_bytes (4 GiB): refused before the body is read. A raw
    # socket, since an HTTP client will not declare more than it sends.
    url = urlparse(service.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(
            b"POST /weights HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            + f"Authorization: Bearer {service.admin_key}\r\n".encode()
            + f"Content-Length: {5 * 2**30}\r\nConnection: close\r\n\r\n".encode()
            + b"--x\r\n"
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:500]
    assert json.loads(body)["limits"] == [{"limit": "weights_max_bytes", "value": 4 * 2**30}]


def test_other_media_types_are_415(service: Service) -> None:
    response = service.client.post("/weights", content=b"abc", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_promote_a_job_and_upload_its_checkpoint_give_the_same_weights(service: Service) -> None:
    job = trained_job(service)
    response = service.client.post("/weights", json={"from_job": job["id"], "name": "shapes"}, timeout=300)
    assert response.status_code in (200, 201), response.text
    promoted = response.json()
    assert promoted["source"] in ("job", "upload") and promoted["model"] == "yolo_nas_s"
    assert promoted["classes"] == ["circle", "square", "triangle"]
    again = service.client.post("/weights", json={"from_job": job["id"]}, timeout=300)
    assert again.status_code == 200 and again.json()["id"] == promoted["id"]

    # The same file downloaded and uploaded: the same weights, by hash.
    listing = service.client.get(f"/jobs/{job['id']}/artifacts").json()["items"]
    best = next(a for a in listing if a["kind"] == "ckpt_best")
    data = service.client.get(best["url"], timeout=300).content
    assert hashlib.sha256(data).hexdigest() == promoted["sha256"]
    uploaded = service.client.post(
        "/weights", files={"file": ("ckpt_best.pth", data, "application/octet-stream")}, timeout=300
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["id"] == promoted["id"]


def test_promote_errors(service: Service, service_settings: Any) -> None:
    response = service.client.post("/weights", json={"from_job": "no-such-job"})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "from_job"]
    queued = job_without_checkpoint(service_settings)
    response = service.client.post("/weights", json={"from_job": queued})
    assert response.status_code == 409 and "queued" in response.json()["detail"]
    service.client.post(f"/jobs/{queued}/cancel")
    response = service.client.post("/weights", json={"from_job": queued})
    assert response.status_code == 409 and "no best checkpoint" in response.json()["detail"]
    for body in ({"from_job": "x", "typo": 1}, {}, []):
        response = service.client.post("/weights", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["loc"][0] == "body"
    response = service.client.post(
        "/weights", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_delete(service: Service, standins: Path) -> None:
    weights = upload(service, standins / "s5_named.pth").json()
    response = service.client.delete(f"/weights/{weights['id']}")
    assert response.status_code == 204 and response.content == b""
    assert service.client.get(f"/weights/{weights['id']}").status_code == 404
    assert service.client.delete(f"/weights/{weights['id']}").status_code == 404
    assert f"store/{weights['id']}.pth" not in disk(service)
    # Registered again, it is new weights.
    again = upload(service, standins / "s5_named.pth")
    assert again.status_code == 201 and again.json()["id"] != weights["id"]


def test_unknown_ids_are_404(service: Service) -> None:
    for method in ("GET", "DELETE"):
        response = service.client.request(method, "/weights/no-such-weights")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
        assert json.loads(response.text)["code"] == "not_found"
