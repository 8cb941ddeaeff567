"""The first /predict after a job succeeds: warmed (the default) vs cold, in one run.

    .venv/bin/python -m bench.first_predict [--jobs N] [--input-size 64] [--markdown FILE]

Two services on SQLite, run one after the other, each training `--jobs` tiny jobs one at a time:
one with the defaults (the worker exports each job for onnxruntime before it records success, the
API's warmer loads the model as soon as it sees the success), one with both off (`serving_export`
and `predict_warm` false: what a first request met before). For each job the harness polls
GET /jobs/{id} every 20 ms; the moment it reads `succeeded` it sends one /predict with one image
and times it. Reported: p50 / p95 / max of those first requests, the backend and whether the model
was already loaded. The inference process is started by the first job of each service, so with
warming off the first job's request also pays the process start (SG's import); that is what a
first request after a restart meets.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.datasets.demo import ShapesSpec, write_shapes_dataset
from app.testing import backend_resources, serve
from bench import harness

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.02


def _payload() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _first_predicts(
    work: Path, *, warm: bool, jobs: int, input_size: int, payload: bytes
) -> list[dict[str, Any]]:
    settings: dict[str, object] = {
        "device": "cpu",
        "log_level": "warning",
        "serving_export": warm,
        "predict_warm": warm,
    }
    home = work / ("warm" if warm else "cold")
    write_shapes_dataset(home / "datasets" / "bench", ShapesSpec(splits=(("train", 16), ("valid", 4))))
    spec = {
        "model": "yolo_nas_s",
        "dataset": {"format": "coco", "path": "bench"},
        "input_size": [input_size, input_size],
        "training": {"max_epochs": 1, "batch_size": 8, "lr_warmup_epochs": 0, "average_best_models": False},
    }
    samples: list[dict[str, Any]] = []
    with ExitStack() as stack:
        backend = stack.enter_context(backend_resources("sqlite", prefix="sgjobs-bench"))
        running = stack.enter_context(serve(backend, home, cwd=ROOT, settings=settings))
        client = stack.enter_context(
            httpx.Client(base_url=running.base_url, headers=running.headers, timeout=300)
        )
        for n in range(jobs):
            job = client.post("/jobs", json={**spec, "name": f"first-{n}"}).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(POLL_SECONDS)
                job = client.get(f"/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
            start = time.perf_counter()
            response = client.post(
                "/predict", data={"job_id": job["id"]}, files=[("files", ("first.jpg", payload))]
            )
            seconds = time.perf_counter() - start
            response.raise_for_status()
            answer = response.json()
            samples.append(
                {"seconds": seconds, "cached": answer["cached"], "backend": answer.get("backend", "pytorch")}
            )
            print(
                f"{'warm' if warm else 'cold'} job {n}: {seconds * 1000:.0f} ms {samples[-1]}",
                file=sys.stderr,
            )
    return samples


def _row(label: str, samples: list[dict[str, Any]]) -> str:
    ms = sorted(s["seconds"] * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    backends = ", ".join(sorted({s["backend"] for s in samples}))
    cached = sum(1 for s in samples if s["cached"])
    return (
        f"| {label} | {statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f} | {backends} | "
        f"{cached} of {len(samples)} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5, help="jobs per service")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--markdown", type=Path, help="append the markdown section to this file")
    args = parser.parse_args()
    payload = _payload()
    work = Path(tempfile.mkdtemp(prefix="sgjobs-bench-first-"))
    warm = _first_predicts(work, warm=True, jobs=args.jobs, input_size=args.input_size, payload=payload)
    cold = _first_predicts(work, warm=False, jobs=args.jobs, input_size=args.input_size, payload=payload)
    load = os.getloadavg()
    lines = [
        "## First /predict after a job succeeds",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPU cores, "
        f"no GPU, {platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f}. Command: `.venv/bin/python -m bench.first_predict {' '.join(sys.argv[1:])}`.",
        f"{args.jobs} jobs per service (YOLO-NAS-S, {args.input_size} px, one epoch), SQLite; the request is "
        "sent within 20 ms of the success being visible; one 320x240 JPEG.",
        "",
        "| first request after success | p50 ms | p95 ms | max ms | backend | model already loaded |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        _row("warmed (defaults: serving export + warmer)", warm),
        _row("cold (`serving_export` and `predict_warm` off)", cold),
        "",
    ]
    harness.emit("\n".join(lines), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
