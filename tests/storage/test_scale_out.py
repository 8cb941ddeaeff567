"""Machines that share nothing but PostgreSQL, Redis and an S3 store (issue 14).

The API and two workers run with three different SGJOBS_HOME folders and `SGJOBS_STORAGE_URL` on a
real SeaweedFS server. A job trains on worker 1, which is killed (with its training process) mid-job;
worker 2, started afterwards on an empty home, resumes it from the checkpoint worker 1 uploaded; the
API lists, downloads and serves the finished model from the store. The dataset is uploaded through
the API and the job starts from weights registered through it: each worker fetches both from the
store into its own home (no folder is shared).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.testing import Backend, RunningService, S3Server, backend_resources, serve, service_env, start_worker
from tests.conftest import PG_ADMIN_URL, REDIS_URL
from tests.datasets.test_router import upload_multipart
from tests.support import Service, make_shapes, tiny_spec, zip_folder
from tests.weights.test_router import upload

pytestmark = pytest.mark.slow

# Enough that worker 1 is still training when the kill lands: with 3, a fast host (and training
# processes tuned for speed) finished every epoch between the wait below and the kill.
EPOCHS = 6
SETTINGS: dict[str, object] = {
    "device": "cpu",
    "heartbeat_seconds": 0.5,
    "report_interval_seconds": 0.2,
    "lease_seconds": 4.0,
    "sweep_interval_seconds": 0.5,
    "resend_after_seconds": 3,
    "storage_sync_seconds": 0.5,
    # The model is exported for onnxruntime by the worker and served by the API from the store.
    "serving_export": True,
    "predict_warm": False,
    "training_spare": False,
}


def _wait_for(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


class Machines:
    """The environment of each 'machine' (its own home), and the workers started on them."""

    def __init__(self, backend: Backend, s3: S3Server, root: Path, prefix: str) -> None:
        self.backend = backend
        self.s3 = s3
        self.root = root
        self.settings = {**SETTINGS, "storage_url": s3.storage_url(prefix)}
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self, home: str) -> dict[str, str]:
        return {**service_env(self.backend, home, **self.settings), **self.s3.env}

    def run(self, home: str, *args: str) -> None:
        (self.root / home).mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "app.cli", *args], env=self.env(home), cwd=self.root, check=True
        )

    def start_worker(self, home: str) -> subprocess.Popen[bytes]:
        proc = start_worker(self.env(home), cwd=self.root, log=self.root / home / "worker.log")
        self.workers.append(proc)
        return proc


@pytest.fixture(scope="module")
def machines(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    root = tmp_path_factory.mktemp("machines")
    with backend_resources(
        "postgres", prefix="sgjobs-scale", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    ) as backend:
        found = Machines(backend, s3, root, prefix=f"scale-{backend.queue}")
        try:
            yield found
        finally:
            for proc in found.workers:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="module")
def api(machines: Machines) -> Iterator[Service]:
    machines.run("api-home", "migrate")
    machines.start_worker("worker-1-home")
    running: RunningService
    with serve(
        machines.backend,
        "api-home",
        cwd=machines.root,
        settings=machines.settings,
        command="api",
        extra_env=machines.s3.env,
    ) as running:
        with httpx.Client(base_url=running.base_url, headers=running.headers, timeout=60) as client:
            yield Service(
                "postgres",
                running.base_url,
                running.home,
                running.home / "datasets",
                running.log_file,
                client,
            )


def _image() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(out, format="PNG")
    return out.getvalue()


def test_a_job_killed_on_one_worker_resumes_on_another_and_is_served_from_the_store(
    machines: Machines, api: Service, standins: Path, tmp_path: Path
) -> None:
    shapes = make_shapes(tmp_path, "scale", splits=(("train", 6), ("valid", 2)))
    uploaded = upload_multipart(api, zip_folder(shapes, wrap="scale"), name="scale")
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    registered = upload(api, standins / "yolo_nas_s_coco.pth")
    assert registered.status_code == 201, registered.text
    weights_id = registered.json()["id"]
    # 6 images in batches of 2: three batches per epoch, a checkpoint at every epoch's end.
    spec = tiny_spec(
        "scale",
        name="scale-out",
        dataset={"id": dataset_id},
        init_from={"weights_id": weights_id},
        training={"max_epochs": EPOCHS, "batch_size": 2},
    )
    job_id = api.submit(spec)["id"]
    client = machines.s3.client()
    prefix = machines.settings["storage_url"].removeprefix(f"s3://{machines.s3.bucket}/")  # type: ignore[union-attr]

    def stored(name: str) -> list[str]:
        listing = client.list_objects_v2(Bucket=machines.s3.bucket, Prefix=f"{prefix}/jobs/{job_id}/")
        return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(name)]

    # Worker 1 trains into epoch 2, after its first checkpoint reached the store; then the machine dies.
    api.wait_until(
        job_id,
        lambda j: (
            j["status"] == "running"
            and ((j["progress"]["epoch"] or 0), (j["progress"]["batch"] or 0)) >= (1, 1)
        ),
        timeout=300,
    )
    _wait_for(lambda: stored("ckpt_latest.pth"), "worker 1's checkpoint in the store", 30)
    first = machines.workers[0]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    worker_1 = api.job(job_id)["worker"]
    # Worker 1 had pulled the uploaded dataset and the registered weights into its own home.
    worker_1_home = machines.root / "worker-1-home"
    assert (worker_1_home / "datasets" / "uploads" / dataset_id).is_dir()
    assert (worker_1_home / "store-cache" / "weights" / weights_id / "weights.pth").is_file()

    machines.start_worker("worker-2-home")
    done = api.wait(job_id, timeout=400)
    assert done["status"] == "succeeded", "\n".join(e["message"] for e in api.events(job_id))
    assert done["attempt"] == 2 and done["worker"] != worker_1
    assert done["started_from"]["weights_id"] == weights_id
    messages = [e["message"] for e in api.events(job_id)]
    # Epoch 2 or later: worker 1 may finish more epochs (and upload them) before the kill lands;
    # either way worker 2 continues, mid-training, from the newest checkpoint that reached the store.
    resumed = [
        m
        for m in messages
        if re.match(rf"attempt 2 resumes from ckpt_latest\.pth at epoch [2-{EPOCHS}]/{EPOCHS}$", m)
    ]
    assert resumed, "\n".join(messages)
    # Worker 2 removed its copy once the job had ended (the store has it all); the API never had one.
    # (The training process records the success; its supervisor removes the copy once it has exited.)
    assert (machines.root / "worker-2-home" / "jobs").is_dir()
    local = machines.root / "worker-2-home" / "jobs" / job_id
    _wait_for(lambda: not local.exists(), "worker 2 to remove its copy of the job", 60)
    assert not (machines.root / "api-home" / "jobs" / job_id).exists()
    assert stored("ckpt_best.pth") and stored("ckpt_best.serving.onnx") and stored("console.log"), stored("")

    # Both worker machines are gone, with their disks: what the API serves comes from the store.
    for proc in machines.workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for home in ("worker-1-home", "worker-2-home"):
        shutil.rmtree(machines.root / home)

    # The API lists and downloads the files from the store ...
    listing = api.client.get(f"/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    by_kind = {a["kind"]: a for a in listing.json()["items"]}
    assert {"ckpt_best", "ckpt_latest", "console_log"} <= set(by_kind)
    best = by_kind["ckpt_best"]
    download = api.client.get(best["url"])
    assert download.status_code == 200
    key = stored("ckpt_best.pth")[0]
    assert download.content == client.get_object(Bucket=machines.s3.bucket, Key=key)["Body"].read()
    assert len(download.content) == best["size"]
    log = api.client.get(by_kind["console_log"]["url"])
    assert log.status_code == 200 and b"Traceback" not in log.content

    # ... and serves the model with onnxruntime from its own cache of the store.
    answer = api.client.post(
        "/predict", files=[("job_id", (None, job_id)), ("files", ("a.png", _image(), "image/png"))]
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["backend"] == "onnxruntime"
