"""Export options on `POST /jobs/{id}/export` and `POST /weights/{id}/export`: validated, passed to
SG's export, each set of options in a file of its own next to the default export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.prediction.helpers import INPUT_SIZE, scene, trained_job
from tests.support import Service

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


@pytest.fixture(scope="module")
def job(service: Service) -> dict[str, Any]:
    return trained_job(service)


def _export(service: Service, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = (
        service.client.post(path, json=body, timeout=600)
        if body is not None
        else (service.client.post(path, timeout=600))
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _run(service: Service, export: dict[str, Any], tmp_path: Path, batch: np.ndarray) -> list[np.ndarray]:
    import onnxruntime

    model_file = tmp_path / Path(export["artifact"]["name"]).name
    model_file.write_bytes(service.client.get(export["artifact"]["url"], timeout=120).content)
    assert model_file.stat().st_size == export["artifact"]["size"]
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    outputs: list[np.ndarray] = session.run(None, {session.get_inputs()[0].name: batch})
    return outputs


@pytest.mark.parametrize(
    "body",
    [
        {"input_size": [100, 64]},  # not a multiple of 32
        {"input_size": [64]},
        {"input_size": [4096, 4096]},
        {"batch_size": 0},
        {"batch_size": 1000},
        {"conf": 1.5},
        {"iou": 0},
        {"fp16": "maybe"},
        {"opset": 17},  # unknown
    ],
)
def test_export_options_are_validated(service: Service, job: dict[str, Any], body: dict[str, Any]) -> None:
    for path in (f"/jobs/{job['id']}/export", "/weights/nope/export"):
        response = service.client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)


def test_thresholds_get_a_file_of_their_own(service: Service, job: dict[str, Any], tmp_path: Path) -> None:
    default = _export(service, f"/jobs/{job['id']}/export")
    assert default["artifact"]["name"] == "export/model.onnx"
    default_file = Path(job["job_dir"]) / default["artifact"]["name"]
    before = default_file.stat().st_mtime_ns

    strict = _export(service, f"/jobs/{job['id']}/export", {"conf": 0.02, "iou": 0.5})
    assert strict["artifact"]["name"] == "export/model-b1-conf0.02-iou0.5.onnx"
    assert (strict["conf"], strict["iou"], strict["cached"]) == (0.02, 0.5, False)
    assert default_file.stat().st_mtime_ns == before, "another export's options overwrote the default file"
    # The defaults spelled out are the default export, not a new file.
    same = _export(service, f"/jobs/{job['id']}/export", {"conf": 0.25, "iou": 0.65, "batch_size": 1})
    assert same["artifact"] == default["artifact"] and same["cached"] is True
    again = _export(service, f"/jobs/{job['id']}/export", {"iou": 0.5, "conf": 0.02})
    assert again["artifact"] == strict["artifact"] and again["cached"] is True

    listing = {i["name"] for i in service.client.get(f"/jobs/{job['id']}/artifacts").json()["items"]}
    assert {default["artifact"]["name"], strict["artifact"]["name"]} <= listing
    image = np.asarray(scene(INPUT_SIZE, INPUT_SIZE), dtype=np.uint8).transpose(2, 0, 1)[None]
    num, _, scores, _ = _run(service, strict, tmp_path, image)
    loose_num = _run(service, default, tmp_path, image)[0]
    assert (scores[0, : int(num[0, 0])] >= 0.02).all()
    assert int(num[0, 0]) <= int(loose_num[0, 0])  # a higher score threshold keeps no more boxes


def test_fp16_on_a_cpu_server_is_refused(service: Service, job: dict[str, Any]) -> None:
    response = service.client.post(f"/jobs/{job['id']}/export", json={"fp16": True}, timeout=600)
    assert response.status_code == 422, response.text
    assert "CUDA" in response.json()["detail"]
    exports = {i["name"] for i in service.client.get(f"/jobs/{job['id']}/artifacts").json()["items"]}
    assert not any("fp16" in name for name in exports)


def test_an_export_over_the_pixel_limit_is_refused_before_it_runs(
    service: Service, job: dict[str, Any]
) -> None:
    # Valid options, but 4 x 2048 x 2048 is over the default export_max_pixels (32 x 640 x 640): the
    # trace of a batch that size takes gigabytes (41 x 1824 x 1568 got the inference process killed for
    # memory, every request it held a 503). Refused as the request's to change, and nothing written.
    for path in (f"/jobs/{job['id']}/export", f"/jobs/{job['id']}/export"):  # twice: not a first-call fluke
        response = service.client.post(path, json={"input_size": [2048, 2048], "batch_size": 4}, timeout=600)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "export_max_pixels" in detail and "16,777,216 pixels" in detail, detail
    exports = {i["name"] for i in service.client.get(f"/jobs/{job['id']}/artifacts").json()["items"]}
    assert not any("2048x2048" in name for name in exports), exports


def test_input_size_and_batch_are_exported(service: Service, job: dict[str, Any], tmp_path: Path) -> None:
    export = _export(service, f"/jobs/{job['id']}/export", {"input_size": [96, 128], "batch_size": 2})
    assert export["artifact"]["name"] == "export/model-96x128-b2-conf0.25-iou0.65.onnx"
    assert export["input_shape"] == [2, 3, 96, 128]
    batch = np.stack(
        [np.asarray(scene(128, 96, seed=i), dtype=np.uint8).transpose(2, 0, 1) for i in range(2)]
    )
    num = _run(service, export, tmp_path, batch)[0]
    assert num.shape == (2, 1)


def test_weights_export_options(service: Service, job: dict[str, Any]) -> None:
    response = service.client.post("/weights", json={"from_job": job["id"]}, timeout=300)
    assert response.status_code in (200, 201), response.text
    weights_id = response.json()["id"]
    default = _export(service, f"/weights/{weights_id}/export")
    strict = _export(service, f"/weights/{weights_id}/export", {"conf": 0.3})
    assert default["artifact"]["name"] == "export/model.onnx"
    assert strict["artifact"]["name"] == "export/model-b1-conf0.3-iou0.65.onnx"
    for export in (default, strict):
        download = service.client.get(export["artifact"]["url"], timeout=120)
        assert download.status_code == 200 and len(download.content) == export["artifact"]["size"]
    for name in ("export/model-..%2F..%2Fx.onnx", "export/model-a/b.onnx", "export/other.onnx"):
        assert service.client.get(f"/weights/{weights_id}/artifacts/{name}").status_code == 404
