"""The same generated shapes in COCO, Hugging Face and YOLO form train through the API alike.

Tiny trainings (8 images, 64 px, one epoch) on the CPU: what matters is that every format reaches the
same training pipeline and the jobs report the same class names.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from app.datasets.demo import ShapesSpec, write_shapes_dataset, write_shapes_hf, write_shapes_yolo
from tests.support import Service, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

SPEC = ShapesSpec(splits=(("train", 8), ("valid", 4)), min_size=64, max_size=96, seed=11)
CLASSES = ["circle", "square", "triangle"]


def _dataset(fmt: str, path: str) -> dict[str, Any]:
    if fmt == "hf":
        return {
            "format": "hf",
            "path": path,
            "bbox_format": "xywh",
            "splits": {"train": "train", "val": "validation"},
        }
    if fmt == "yolo":
        return {"format": "yolo", "path": path, "data_yaml": "data.yaml"}
    return {"format": "coco", "path": path}


@pytest.fixture(scope="module")
def jobs(service: Service) -> dict[str, dict[str, Any]]:
    """One job per format, submitted together, plus one on an uploaded (registered) YOLO dataset."""
    write_shapes_dataset(service.datasets_dir / "fmt-coco", SPEC)
    write_shapes_hf(service.datasets_dir / "fmt-hf", SPEC)
    yolo_root = write_shapes_yolo(service.datasets_dir / "fmt-yolo", SPEC)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(yolo_root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(yolo_root).as_posix())
    uploaded = service.client.post(
        "/datasets", files={"file": ("shapes.zip", buffer.getvalue(), "application/zip")}, timeout=120
    )
    assert uploaded.status_code == 201, uploaded.text
    submitted = {
        fmt: service.submit(tiny_spec(f"fmt-{fmt}", name=f"fmt-{fmt}", dataset=_dataset(fmt, f"fmt-{fmt}")))
        for fmt in ("coco", "hf", "yolo")
    }
    submitted["registered"] = service.submit(
        tiny_spec("registered", name="fmt-registered", dataset={"id": uploaded.json()["id"]})
    )
    return {name: service.wait(job["id"], timeout=900) for name, job in submitted.items()}


@pytest.mark.parametrize("name", ["coco", "hf", "yolo", "registered"])
def test_every_format_trains_with_the_same_classes(
    service: Service, jobs: dict[str, dict[str, Any]], name: str
) -> None:
    job = jobs[name]
    assert job["status"] == "succeeded", service.events(job["id"])
    assert job["classes"] == CLASSES
    assert job["best_metric"]["value"] is not None
    assert any(
        e["message"].startswith("dataset ready: 3 classes, 8 training") for e in service.events(job["id"])
    )


def test_registered_dataset_job_stores_the_format(jobs: dict[str, dict[str, Any]]) -> None:
    assert jobs["registered"]["spec"]["dataset"]["format"] == "yolo"


def test_hf_images_are_cached_in_the_dataset_not_the_job(
    service: Service, jobs: dict[str, dict[str, Any]]
) -> None:
    cache = service.datasets_dir / "fmt-hf" / ".sgjobs-cache"
    assert list(cache.glob("hf-*/train-*/0000000.jpg"))
    job_dir = Path(jobs["hf"]["job_dir"])
    assert not [p for p in job_dir.rglob("*") if p.suffix in (".jpg", ".png")]


@pytest.mark.parametrize("fmt", ["hf", "yolo"])
def test_dataset_with_errors_fails_fast_with_the_report(service: Service, fmt: str) -> None:
    root = (write_shapes_hf if fmt == "hf" else write_shapes_yolo)(
        service.datasets_dir / f"fmt-bad-{fmt}", SPEC
    )
    if fmt == "yolo":
        sorted((root / "labels" / "train").glob("*.txt"))[0].write_text("9 0.5 0.5 0.2 0.2\n")
        needle = "class id 9"
    else:
        (root / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 broken")
        needle = "cannot be loaded"
    job = service.submit(tiny_spec(root.name, dataset=_dataset(fmt, root.name)))
    done = service.wait(job["id"], timeout=180)
    assert done["status"] == "failed" and done["error"]["reason"] == "dataset_error"
    assert needle in done["error"]["message"], done["error"]
    assert not (Path(done["job_dir"]) / "checkpoints").exists()
    errors = [e for e in service.events(job["id"]) if e["level"] == "error"]
    assert errors and errors[0]["data"]["problems"][0]["severity"] == "error"
