"""Dataset uploads and the registry through the real service (both backends), and job specs naming them."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth.principal import DEFAULT_TENANT
from app.datasets.demo import ShapesSpec, write_shapes_dataset, write_shapes_hf, write_shapes_yolo
from app.db import session_scope, utcnow
from app.jobs.models import Job, JobStatus
from app.settings import Settings
from tests.support import Service, tiny_spec, zip_folder

SPEC = ShapesSpec(splits=(("train", 6), ("valid", 3)), min_size=64, max_size=96)
WRITERS = {"coco": write_shapes_dataset, "yolo": write_shapes_yolo, "hf": write_shapes_hf}


def tar_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


def upload_multipart(service: Service, data: bytes, **fields: str) -> httpx.Response:
    return service.client.post(
        "/datasets", files={"file": ("dataset.zip", data, "application/zip")}, data=fields, timeout=120
    )


def upload_raw(service: Service, data: bytes, content_type: str, **params: str) -> httpx.Response:
    return service.client.post(
        "/datasets", content=data, headers={"content-type": content_type}, params=params, timeout=120
    )


@pytest.mark.parametrize("fmt", ["coco", "yolo", "hf"])
def test_upload_each_format(service: Service, tmp_path: Path, fmt: str) -> None:
    folder = WRITERS[fmt](tmp_path / fmt, SPEC)
    response = upload_multipart(service, zip_folder(folder, wrap=f"my-{fmt}"), name=f"shapes-{fmt}")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["format"] == fmt and dataset["name"] == f"shapes-{fmt}"
    assert dataset["status"] == "ready", dataset["report"]
    assert dataset["classes"] == ["circle", "square", "triangle"]
    report = dataset["report"]
    assert report["ok"] and report["errors"] == 0
    assert report["splits"]["train"]["images"] == 6 and report["splits"]["val"]["images"] == 3
    assert (service.datasets_dir / dataset["path"]).is_dir()
    assert service.client.get(f"/datasets/{dataset['id']}").json()["id"] == dataset["id"]
    listed = service.client.get("/datasets", params={"limit": 200}).json()
    assert dataset["id"] in [d["id"] for d in listed["items"]]


def test_raw_tar_upload_with_query_parameters(service: Service, tmp_path: Path) -> None:
    folder = write_shapes_hf(tmp_path / "hf", SPEC, bbox_format="xyxy")
    response = upload_raw(service, tar_folder(folder), "application/gzip", name="raw", bbox_format="xyxy")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "ready" and dataset["options"] == {"bbox_format": "xyxy"}
    # Validating it with the wrong box format finds the problem, and stores the new option.
    report = service.client.post(
        f"/datasets/{dataset['id']}/validate", params={"bbox_format": "cxcywh"}
    ).json()
    assert report["ok"] is False
    assert any("bbox_format" in p["problem"] for p in report["problems"])
    assert service.client.get(f"/datasets/{dataset['id']}").json()["status"] == "invalid"
    report = service.client.post(f"/datasets/{dataset['id']}/validate", params={"bbox_format": "xyxy"}).json()
    assert report["ok"] is True


def test_upload_with_problems_is_registered_as_invalid(service: Service, tmp_path: Path) -> None:
    folder = write_shapes_yolo(tmp_path / "bad", SPEC)
    label = sorted((folder / "labels" / "train").glob("*.txt"))[0]
    label.write_text("5 0.5 0.5 0.1 0.1\n")
    response = upload_multipart(service, zip_folder(folder))
    assert response.status_code == 201
    dataset = response.json()
    assert dataset["status"] == "invalid"
    (problem,) = [p for p in dataset["report"]["problems"] if p["severity"] == "error"]
    assert problem["file"] == f"labels/train/{label.name}" and "class id 5" in problem["problem"]


def test_zip_slip_upload_is_422(service: Service) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../escape.txt", "x")
    before = (
        set((service.datasets_dir / "uploads").iterdir())
        if (service.datasets_dir / "uploads").exists()
        else set()
    )
    response = upload_multipart(service, buffer.getvalue())
    assert response.status_code == 422 and "zip slip" in response.json()["detail"]
    assert not (service.datasets_dir.parent / "escape.txt").exists()
    after = {p for p in (service.datasets_dir / "uploads").iterdir() if not p.name.startswith(".")}
    assert after <= before


def test_oversized_archive_is_413_naming_the_limit(service: Service) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\x00" * (40 * 2**20))
    response = upload_raw(service, buffer.getvalue(), "application/zip")
    assert response.status_code == 413
    body = response.json()
    assert body["limits"][0]["limit"] == "upload_max_ratio" and "upload_max_ratio" in body["detail"]


def test_corrupt_archive_is_422(service: Service) -> None:
    response = upload_raw(service, b"PK\x03\x04" + b"\x17" * 500, "application/octet-stream")
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_archive"


def test_unknown_layout_and_media_type(service: Service) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "no dataset here")
    response = upload_raw(service, buffer.getvalue(), "application/zip")
    assert response.status_code == 422 and "not recognised" in response.json()["detail"]
    assert upload_raw(service, b"{}", "application/json").status_code == 415
    assert upload_multipart(service, b"").status_code == 422


def test_get_and_delete_unknown_is_404(service: Service) -> None:
    assert service.client.get("/datasets/nope").status_code == 404
    assert service.client.delete("/datasets/nope").status_code == 404
    assert service.client.post("/datasets/nope/validate").status_code == 404


def _job_on(settings: Settings, dataset_id: str, status: JobStatus) -> str:
    with session_scope(settings.database_url) as session:
        job = Job(
            tenant=DEFAULT_TENANT,
            status=status,
            model="yolo_nas_s",
            spec={"model": "yolo_nas_s", "dataset": {"format": "coco", "id": dataset_id}},
            max_epochs=1,
            best_metric_name="mAP@0.50",
            created_at=utcnow(),
            started_at=utcnow(),
            heartbeat_at=utcnow(),
            enqueued_at=utcnow(),
        )
        session.add(job)
        session.flush()
        return job.id


def _set_status(settings: Settings, job_id: str, status: JobStatus) -> None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        job.finished_at = utcnow()


def test_delete_refused_while_a_running_job_uses_it(
    service: Service, service_settings: Settings, tmp_path: Path
) -> None:
    folder = write_shapes_dataset(tmp_path / "coco", SPEC)
    dataset = upload_multipart(service, zip_folder(folder)).json()
    # A running job (inserted directly: the worker never sees it, so it stays running during the test).
    job_id = _job_on(service_settings, dataset["id"], JobStatus.running)
    response = service.client.delete(f"/datasets/{dataset['id']}")
    assert response.status_code == 409 and job_id in response.json()["detail"]
    _set_status(service_settings, job_id, JobStatus.failed)
    assert service.client.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert service.client.get(f"/datasets/{dataset['id']}").status_code == 404
    assert not (service.datasets_dir / "uploads" / dataset["id"]).exists()


# --------------------------------------------------------------------------------------------------
# Job specs: the dataset part
# --------------------------------------------------------------------------------------------------


def _errors(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    return str(body["detail"])


def test_spec_options_must_fit_the_format(service: Service) -> None:
    base = tiny_spec("x")
    cases = [
        ({"format": "coco", "path": "x", "bbox_format": "xyxy"}, "bbox_format applies to format 'hf' only"),
        ({"format": "yolo", "path": "x", "splits": {"train": "train"}}, "splits applies to format 'hf' only"),
        ({"format": "hf", "path": "x", "data_yaml": "d.yaml"}, "data_yaml applies to format 'yolo' only"),
        ({"format": "hf", "path": "x", "bbox_format": "xywhr"}, "bbox_format"),
        ({"format": "coco", "path": "x", "id": "abc"}, "exactly one of path"),
        ({"format": "coco"}, "exactly one of path"),
        ({"path": "x"}, "format is required"),
    ]
    for dataset, needle in cases:
        assert needle in _errors(service.post_job({**base, "dataset": dataset})), dataset


def test_spec_naming_an_unknown_or_mismatched_dataset(service: Service, tmp_path: Path) -> None:
    response = service.post_job({**tiny_spec("x"), "dataset": {"id": "nope"}})
    assert "not registered" in _errors(response)
    assert response.json()["errors"][0]["loc"] == ["body", "dataset", "id"]
    folder = write_shapes_yolo(tmp_path / "y", SPEC)
    dataset = upload_multipart(service, zip_folder(folder)).json()
    assert "is a yolo dataset, not coco" in _errors(
        service.post_job({**tiny_spec("x"), "dataset": {"format": "coco", "id": dataset["id"]}})
    )
    assert "bbox_format does not apply" in _errors(
        service.post_job({**tiny_spec("x"), "dataset": {"id": dataset["id"], "bbox_format": "xyxy"}})
    )


@pytest.mark.parametrize("fmt", ["yolo", "hf"])
def test_layout_checked_at_post(service: Service, fmt: str) -> None:
    (service.datasets_dir / f"empty-{fmt}").mkdir(exist_ok=True)
    response = service.post_job({**tiny_spec("x"), "dataset": {"format": fmt, "path": f"empty-{fmt}"}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "dataset"]
