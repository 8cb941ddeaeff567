"""The jobs API's contract and its 4xx answers, through real HTTP against `sgjobs serve`."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.support import Service, make_shapes, tiny_spec


@pytest.fixture(scope="module")
def shapes(service: Service) -> str:
    make_shapes(service.datasets_dir, "api-shapes", splits=(("train", 4), ("valid", 2)))
    return "api-shapes"


def _locs(response_json: dict[str, Any]) -> list[list[Any]]:
    return [e["loc"] for e in response_json["errors"]]


def test_health_and_readiness(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "workers": "ok", "broker": "ok"}


def test_openapi_docs_are_served(service: Service) -> None:
    assert service.client.get("/docs").status_code == 200
    paths = service.client.get("/openapi.json").json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/jobs/{job_id}/metrics"} <= set(paths)
    assert {"get", "delete"} <= set(paths["/jobs/{job_id}"]) and "post" in paths["/jobs/{job_id}/resume"]


def test_minimal_spec_gets_the_seed_defaults(service: Service, shapes: str) -> None:
    response = service.post_job({"model": "yolo_nas_s", "dataset": {"format": "coco", "path": shapes}})
    assert response.status_code == 201, response.text
    job = response.json()
    # Never let it train (it would occupy the worker): cancel it while it is still queued or starting.
    service.client.post(f"/jobs/{job['id']}/cancel")
    assert job["status"] == "queued"
    assert job["progress"]["max_epochs"] == 10
    assert job["best_metric"] == {"name": "mAP@0.50", "value": None}
    training = job["spec"]["training"]
    assert training["initial_lr"] == 5e-4 and training["warmup_initial_lr"] == 1e-5
    assert training["optimizer"] == "AdamW" and training["lr_mode"] == "cosine"
    assert training["cosine_final_lr_ratio"] == 0.5 and training["batch_size"] == 16
    assert training["average_best_models"] is True and training["ema"] is False
    assert job["spec"]["input_size"] == [640, 640]
    assert job["created_at"].endswith(("Z", "+00:00"))


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"unknown_field": 1}, ["body", "unknown_field"]),
        ({"model": "yolo_v8"}, ["body", "model"]),
        ({"input_size": [100, 100]}, ["body", "input_size"]),
        ({"training": {"max_epochs": 0}}, ["body", "training", "max_epochs"]),
        ({"training": {"initial_lr": -1}}, ["body", "training", "initial_lr"]),
        ({"training": {"optimizer": "os.system"}}, ["body", "training", "optimizer"]),
        ({"training": {"metric_to_watch": "mAP@0.95"}}, ["body", "training", "metric_to_watch"]),
        ({"training": {"batch_size": 8, "typo": True}}, ["body", "training", "typo"]),
        ({"dataset": {"format": "coco", "path": "../etc"}}, ["body", "dataset", "path"]),
        ({"dataset": {"format": "coco", "path": "/etc"}}, ["body", "dataset", "path"]),
        ({"dataset": {"format": "voc", "path": "x"}}, ["body", "dataset", "format"]),
    ],
)
def test_invalid_specs_get_field_level_422(
    service: Service, shapes: str, change: dict[str, Any], loc: list[Any]
) -> None:
    spec = tiny_spec(shapes)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key == "training":
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    response = service.post_job(spec)
    assert response.status_code == 422, response.text
    assert any(found[: len(loc)] == loc for found in _locs(response.json())), response.json()


def test_metric_to_watch_error_lists_the_valid_names(service: Service, shapes: str) -> None:
    response = service.post_job(tiny_spec(shapes, training={"metric_to_watch": "accuracy"}))
    assert response.status_code == 422
    assert "PPYoloELoss/loss_cls" in response.text and "mAP@0.50" in response.text


def test_dataset_that_does_not_exist_is_422(service: Service) -> None:
    response = service.post_job(tiny_spec("no-such-dataset"))
    assert response.status_code == 422
    assert "does not exist" in response.json()["detail"]
    assert _locs(response.json()) == [["body", "dataset", "path"]]


def test_symlink_out_of_the_datasets_dir_is_422(service: Service, tmp_path: Any) -> None:
    outside = tmp_path / "outside"
    make_shapes(outside.parent, outside.name, splits=(("train", 2), ("valid", 1)))
    link = service.datasets_dir / "escape-link"
    if not link.exists():
        os.symlink(outside, link)
    response = service.post_job(tiny_spec("escape-link"))
    assert response.status_code == 422
    assert "outside the datasets directory" in response.json()["detail"]


def test_dataset_without_a_training_split_is_422(service: Service) -> None:
    (service.datasets_dir / "empty-dir").mkdir(exist_ok=True)
    response = service.post_job(tiny_spec("empty-dir"))
    assert response.status_code == 422
    assert _locs(response.json()) == [["body", "dataset"]]


def test_init_from_unknown_or_unfinished_job_is_422(service: Service, shapes: str) -> None:
    response = service.post_job(tiny_spec(shapes, init_from={"job_id": "nope"}))
    assert response.status_code == 422
    assert _locs(response.json()) == [["body", "init_from", "job_id"]]


def test_unknown_job_is_404_everywhere(service: Service) -> None:
    for method, path in (
        ("GET", "/jobs/nope"),
        ("POST", "/jobs/nope/cancel"),
        ("POST", "/jobs/nope/resume"),
        ("DELETE", "/jobs/nope"),
        ("GET", "/jobs/nope/metrics"),
        ("GET", "/jobs/nope/events"),
    ):
        response = service.client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert "nope" in response.json()["detail"]


def test_list_jobs_filters_and_paginates_newest_first(service: Service, shapes: str) -> None:
    ids = []
    for i in range(3):
        job = service.submit(tiny_spec(shapes, name=f"list-{i}"))
        service.client.post(f"/jobs/{job['id']}/cancel")
        ids.append(job["id"])
    for job_id in ids:
        # A worker may have claimed a job before its cancel: it is cancelled once its training stops.
        service.wait(job_id, timeout=300)
    page = service.client.get("/jobs", params={"status": "cancelled", "limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert all(j["status"] == "cancelled" for j in page["items"])
    assert page["total"] >= 3
    second = service.client.get("/jobs", params={"status": "cancelled", "limit": 2, "offset": 1}).json()
    assert second["items"][0]["id"] == ids[1]
    assert service.client.get("/jobs", params={"status": "bogus"}).status_code == 422


def test_bad_cursor_is_422(service: Service, shapes: str) -> None:
    job = service.submit(tiny_spec(shapes))
    service.client.post(f"/jobs/{job['id']}/cancel")
    response = service.client.get(f"/jobs/{job['id']}/metrics", params={"cursor": "abc"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("path", "params", "loc"),
    [
        ("/jobs", {"offset": "850034483708344926208"}, ["query", "offset"]),
        ("/jobs", {"limit": "0"}, ["query", "limit"]),
        ("/datasets", {"offset": str(2**63)}, ["query", "offset"]),
        ("/jobs/{id}/metrics", {"cursor": "²"}, ["query", "cursor"]),
        ("/jobs/{id}/metrics", {"cursor": "99999999999999999999"}, ["query", "cursor"]),
        ("/jobs/{id}/metrics", {"name": "a\x00b"}, ["query", "name", 0]),
        ("/jobs/{id}/events", {"cursor": "-1"}, ["query", "cursor"]),
    ],
)
def test_out_of_range_numbers_and_malformed_cursors_are_422(
    service: Service, shapes: str, path: str, params: dict[str, str], loc: list[Any]
) -> None:
    job = service.submit(tiny_spec(shapes))
    service.client.post(f"/jobs/{job['id']}/cancel")
    response = service.client.get(path.replace("{id}", job["id"]), params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert loc in _locs(response.json())


def test_every_error_is_a_problem_document(service: Service, shapes: str) -> None:
    job = service.submit(tiny_spec(shapes))
    service.client.post(f"/jobs/{job['id']}/cancel")
    cases = [
        ("GET", "/jobs/nope", None, 404, "not_found"),
        ("GET", "/no-such-route", None, 404, "not_found"),
        ("PUT", "/jobs", None, 405, "method_not_allowed"),
        ("POST", "/jobs", {"model": "yolo_nas_s"}, 422, "invalid_input"),
        ("POST", "/jobs", {**tiny_spec(shapes), "name": "a\x00b"}, 422, "invalid_input"),
        ("GET", "/jobs/a%00b", None, 422, "invalid_input"),
    ]
    for method, path, body, status, code in cases:
        response = service.client.request(method, path, json=body)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json", (method, path)
        problem = response.json()
        assert problem["status"] == status and problem["code"] == code, problem
        assert problem["title"] and problem["detail"] and problem["type"], problem
        if status == 422:
            assert all({"loc", "msg", "type"} <= set(e) for e in problem["errors"]), problem


def test_operation_ids_are_short_and_every_error_is_declared(service: Service) -> None:
    schema = service.client.get("/openapi.json").json()
    operations = {op["operationId"]: op for ops in schema["paths"].values() for op in ops.values()}
    # Generated clients name their functions after these: changing one breaks every client.
    assert set(operations) == {
        "create_job",
        "list_jobs",
        "get_job",
        "cancel_job",
        "resume_job",
        "delete_job",
        "list_job_metrics",
        "list_job_events",
        "list_job_webhooks",
        "stream_job",
        "get_metrics",
        "list_artifacts",
        "download_artifact",
        "export_job",
        "upload_dataset",
        "list_datasets",
        "get_dataset",
        "delete_dataset",
        "validate_dataset",
        "create_weights",
        "list_weights",
        "get_weights",
        "delete_weights",
        "export_weights",
        "download_weights_artifact",
        "predict",
        "get_predict_stats",
        "healthz",
        "readyz",
    }
    for name, op in operations.items():
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and name != "readyz":
                assert list(response["content"]) == ["application/problem+json"], (name, status)
