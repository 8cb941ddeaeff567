"""A job's files over HTTP: listing with sizes, downloads confined to the job directory, ONNX export
that runs in onnxruntime. Uses the tiny job the prediction tests train (trained here if run alone)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.settings import Settings
from tests.prediction.helpers import INPUT_SIZE, job_without_checkpoint, scene, trained_job
from tests.support import Service

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]


@pytest.fixture(scope="module")
def job(service: Service) -> dict[str, Any]:
    return trained_job(service)


def _on_disk(job_dir: Path, name: str, item: dict[str, Any]) -> Path:
    path = job_dir / name
    if item["kind"] == "tensorboard":
        # Served without TensorFlow's host name and process id: `events.out.tfevents.<time>`.
        (path,) = path.parent.glob(f"{path.name}.*")
    return path


def _listing(service: Service, job_id: str) -> dict[str, dict[str, Any]]:
    response = service.client.get(f"/jobs/{job_id}/artifacts")
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()["items"]}


def test_artifacts_list_the_job_files_with_their_sizes(service: Service, job: dict[str, Any]) -> None:
    items = _listing(service, job["id"])
    job_dir = Path(job["job_dir"])
    kinds = {item["kind"] for item in items.values()}
    assert {"ckpt_best", "ckpt_latest", "average_model", "console_log", "tensorboard"} <= kinds, items
    for name, item in items.items():
        path = _on_disk(job_dir, name, item)
        assert path.is_file() and item["size"] == path.stat().st_size
        assert item["url"] == f"/jobs/{job['id']}/artifacts/{name}"
    best = next(i for i in items.values() if i["kind"] == "ckpt_best")
    assert str(job_dir / best["name"]) == job["artifacts"]["ckpt_best"]
    tensorboard = [n for n, i in items.items() if i["kind"] == "tensorboard"]
    assert tensorboard and all(Path(n).name.startswith("events.out.tfevents.") for n in tensorboard)
    assert "console.log" in items


def test_each_listed_file_downloads(service: Service, job: dict[str, Any]) -> None:
    job_dir = Path(job["job_dir"])
    for name, item in _listing(service, job["id"]).items():
        with service.client.stream("GET", item["url"]) as response:
            assert response.status_code == 200, name
            assert int(response.headers["content-length"]) == item["size"]
            assert Path(name).name in response.headers["content-disposition"]
            if item["size"] < 5_000_000:  # checkpoints are 100+ MB: headers are enough for those
                assert response.read() == _on_disk(job_dir, name, item).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fsgjobs.db",
        "%2E%2E/%2E%2E/sgjobs.db",
        "%2Fetc%2Fpasswd",
        "dataset/train.json",  # in the job directory, but not an artifact
        "result.json",
        "checkpoints",
        "nothing-here.pth",
    ],
)
def test_downloads_outside_the_listed_files_are_not_found(
    service: Service, job: dict[str, Any], name: str
) -> None:
    response = service.client.get(f"/jobs/{job['id']}/artifacts/{name}")
    assert response.status_code == 404, response.text


def test_unknown_job_is_not_found(service: Service) -> None:
    assert service.client.get("/jobs/nope/artifacts").status_code == 404
    assert service.client.get("/jobs/nope/artifacts/console.log").status_code == 404
    assert service.client.post("/jobs/nope/export").status_code == 404


def test_export_of_a_job_without_checkpoint_is_a_conflict(
    service: Service, service_settings: Settings
) -> None:
    job_id = job_without_checkpoint(service_settings)
    assert service.client.get(f"/jobs/{job_id}/artifacts").json()["items"] == []
    response = service.client.post(f"/jobs/{job_id}/export")
    assert response.status_code == 409, response.text


def test_onnx_export_runs_in_onnxruntime(service: Service, job: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime
    from PIL import Image

    start = time.perf_counter()
    response = service.client.post(f"/jobs/{job['id']}/export", timeout=600)
    assert response.status_code == 200, response.text
    export = response.json()
    first_seconds = time.perf_counter() - start
    assert export["artifact"]["name"] == "export/model.onnx"
    assert export["input_shape"] == [1, 3, INPUT_SIZE, INPUT_SIZE] and export["input_dtype"] == "uint8"
    assert export["classes"] == job["classes"]
    assert export["artifact"]["name"] in _listing(service, job["id"])

    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(service.client.get(export["artifact"]["url"], timeout=120).content)
    assert model_file.stat().st_size == export["artifact"]["size"]
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    [graph_input] = session.get_inputs()
    # The graph holds the preprocessing: it takes the image as uint8 RGB, resized to the input size.
    image = Image.fromarray(scene(240, 180)).resize((INPUT_SIZE, INPUT_SIZE))
    batch = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]
    num, boxes, scores, classes = session.run(None, {graph_input.name: batch})
    assert num.shape == (1, 1) and 0 <= int(num[0, 0]) <= boxes.shape[1]
    assert boxes.shape[0] == 1 and boxes.shape[2] == 4
    n = int(num[0, 0])
    assert ((scores[0, :n] >= export["conf"]) & (scores[0, :n] <= 1)).all()
    assert ((classes[0, :n] >= 0) & (classes[0, :n] < len(job["classes"]))).all()

    # A second call returns the same file without exporting again.
    again = service.client.post(f"/jobs/{job['id']}/export", timeout=600)
    assert again.status_code == 200 and again.json()["cached"] is True
    assert again.json()["artifact"] == export["artifact"]
    print(f"export: {first_seconds:.1f} s, {export['artifact']['size'] / 1e6:.1f} MB")
