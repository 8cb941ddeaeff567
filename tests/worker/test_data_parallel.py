"""One job on several devices: `gpus` > 1 trains with super-gradients' DDP, one process per rank.

A worker of a pool of its own offers slots of 2 (`sgjobs worker --gpus-per-slot 2`); on this
CPU-only machine its ranks train over gloo, each on a share of the cores (`app.ml.distributed`).
Everything else is the production path: the API, PostgreSQL, Redis, the worker, the training
process as rank 0 and its helper rank (`worker.ranks`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from app import testing
from app.testing import Backend, service_env
from tests.conftest import SERVICE_SETTINGS
from tests.support import Service, make_shapes, tiny_spec

pytestmark = pytest.mark.backends("postgres")

POOL = "ddp"
DATASET = "ddp-shapes"
# 16 training images: 8 per rank, 2 batches of 4 per epoch on each (4 on one process).
TRAINING = {"max_epochs": 2, "batch_size": 4, "lr_warmup_epochs": 0, "seed": 0}


@pytest.fixture(scope="module")
def ddp_worker(backend: Backend, service: Service) -> Iterator[None]:
    """A worker of pool `POOL` whose slot offers 2 devices, on the service's database and broker."""
    make_shapes(service.datasets_dir, DATASET, splits=(("train", 16), ("valid", 8)))
    env = service_env(backend, service.home.name, **{**SERVICE_SETTINGS, "worker_queue": POOL})
    proc = testing.start_worker(
        env, cwd=service.home.parent, log=service.home / "ddp-worker.log", args=("--gpus-per-slot", "2")
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        response = service.post_job(tiny_spec(DATASET, queue=POOL, gpus=3))
        if "offers 2 GPUs" in response.text:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the worker of pool {POOL!r} never offered 2 GPUs")
    yield
    testing.stop_worker(proc)


def _spec(**training: Any) -> dict[str, Any]:
    return tiny_spec(DATASET, queue=POOL, gpus=2, training={**TRAINING, **training})


def _ranks(job_id: str) -> list[psutil.Process]:
    """The live helper ranks of the job (their command line names its ranks.json)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "worker.ranks" in cmdline and job_id in cmdline:
            found.append(proc)
    return found


def _gone(procs: list[psutil.Process], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
            return True
        time.sleep(0.2)
    return False


def test_more_gpus_than_the_largest_slot_is_refused(service: Service, ddp_worker: None) -> None:
    response = service.post_job(_spec() | {"gpus": 3})
    assert response.status_code == 422
    assert (
        response.json()["detail"] == "gpus: 3 requested, but the largest worker of pool 'ddp' offers 2 GPUs"
    )


def test_a_two_gpu_job_trains_data_parallel_and_reports_from_rank_0(
    service: Service, ddp_worker: None
) -> None:
    job = service.submit(_spec())
    helpers: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    while not helpers and time.monotonic() < deadline:
        if service.job(job["id"])["status"] not in ("queued", "running"):
            break
        helpers = _ranks(job["id"])
        time.sleep(0.2)
    assert len(helpers) == 1, "rank 1 never ran"
    helper_env = helpers[0].environ()
    assert (helper_env["RANK"], helper_env["WORLD_SIZE"]) == ("1", "2")

    done = service.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    messages = [e["message"] for e in service.events(job["id"])]
    # Each rank trains half of every epoch: 8 images, 2 batches of 4 (one process would take 4).
    assert any(
        m.startswith("training yolo_nas_s on cpu × 2 processes (DDP): 16 train / 8 valid images, 2 batches")
        for m in messages
    ), messages
    # Rank 0 alone reports: one point per epoch and one progress step per batch, no duplicates.
    epochs = [p["epoch"] for p in service.metrics(job["id"], name="Valid_mAP@0.50")]
    assert epochs == [0, 1]
    steps = [p["step"] for p in service.metrics(job["id"], name="Batch_PPYoloELoss/loss")]
    assert steps == [0, 1, 2, 3]
    assert [m for m in messages if m.startswith("epoch ")] == [
        m for m in messages if m.startswith("epoch 1/2") or m.startswith("epoch 2/2")
    ]
    assert len([m for m in messages if m.startswith("epoch ")]) == 2
    assert _gone(helpers)

    job_dir = service.home / "jobs" / job["id"]
    # The helper logged into a folder of its own: SG truncates the console log of the folder it imports in.
    assert list((job_dir / "logs" / "rank1").glob("logs_*.log"))
    assert not (job_dir / "ranks.json").exists()
    # The model trained data-parallel is served like any other.
    image = next((service.datasets_dir / DATASET / "valid").glob("*.jpg")).read_bytes()
    predicted = service.client.post(
        "/predict",
        data={"job_id": job["id"]},
        files=[("files", ("shape.jpg", image, "image/jpeg"))],
        timeout=300,
    )
    assert predicted.status_code == 200, predicted.text
    body = predicted.json()
    assert body["job_id"] == job["id"] and len(body["images"]) == 1
    assert body["classes"] == ["circle", "square", "triangle"]


def test_a_cancel_stops_every_rank_at_once(service: Service, ddp_worker: None) -> None:
    job = service.submit(_spec(max_epochs=50))
    service.wait_until(job["id"], lambda j: (j["progress"]["batch"] or 0) >= 1, timeout=300)
    helpers = _ranks(job["id"])
    assert len(helpers) == 1
    assert service.client.post(f"/jobs/{job['id']}/cancel").status_code in (200, 202)
    done = service.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled", done
    messages = [e["message"] for e in service.events(job["id"])]
    assert any(m.startswith("training stopped: training cancelled during epoch") for m in messages), messages
    assert _gone(helpers)


def test_a_killed_rank_loses_the_attempt_and_the_job_resumes(service: Service, ddp_worker: None) -> None:
    job = service.submit(_spec(max_epochs=3))
    # After the first epoch's checkpoint: the next attempt resumes from it.
    service.wait_until(job["id"], lambda j: (j["progress"]["epoch"] or 0) >= 1, timeout=300)
    [helper] = _ranks(job["id"])
    os.kill(helper.pid, signal.SIGKILL)
    done = service.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", (done, [e["message"][:300] for e in service.events(job["id"])])
    assert done["attempt"] == 2 and done["restarts"] == 1, done
    messages = [e["message"] for e in service.events(job["id"])]
    assert any("the training process of rank 1 of 2 was killed by SIGKILL" in m for m in messages), messages
    assert any(m.startswith("attempt 2 resumes from ckpt_latest.pth at epoch") for m in messages), messages
    assert [p["epoch"] for p in service.metrics(job["id"], name="Valid_mAP@0.50")] == [0, 1, 2]
