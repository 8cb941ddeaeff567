"""Warm /predict latency against super-gradients' in-process predict, and throughput with 4 clients.

    .venv/bin/python -m bench.predict_latency                 # starts `sgjobs serve`, trains a tiny model
    .venv/bin/python -m bench.predict_latency --url http://127.0.0.1:8000 --job <id>

Everything runs in one invocation on one machine: N sequential warm requests of one image over
HTTP, then the same image through `model.predict` in a process of its own (super-gradients'
import rewires stdout and logging) two ways: as the seed calls it (`fuse_model=False`) and the
best in-process way (one held fused pipeline). Then 4 concurrent HTTP clients. Prints a markdown
section (and appends it to --markdown FILE if given).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from app.testing import backend_resources, serve

ROOT = Path(__file__).resolve().parents[1]


def _image(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        size = int(rng.integers(min(width, height) // 6, min(width, height) // 2))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        draw.ellipse((x, y, x + size, y + size), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return np.asarray(image)


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


def _train(client: httpx.Client, home: Path, input_size: int) -> str:
    from app.datasets.demo import ShapesSpec, write_shapes_dataset

    write_shapes_dataset(home / "datasets" / "bench", ShapesSpec(splits=(("train", 32), ("valid", 8))))
    spec = {
        "name": "bench",
        "model": "yolo_nas_s",
        "dataset": {"format": "coco", "path": "bench"},
        "input_size": [input_size, input_size],
        "training": {"max_epochs": 2, "batch_size": 8, "lr_warmup_epochs": 0, "average_best_models": False},
    }
    job = client.post("/jobs", json=spec).json()
    print(f"training job {job['id']} ({input_size} px)...", file=sys.stderr)
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = client.get(f"/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"training failed: {job['error']}")
    return str(job["id"])


def _http_latency(client: httpx.Client, job_id: str, payload: bytes, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.post("/predict", data={"job_id": job_id}, files=[("files", ("bench.jpg", payload))])
        samples.append(time.perf_counter() - start)
        response.raise_for_status()
    return samples


def _throughput(
    url: str, headers: dict[str, str], job_id: str, payload: bytes, clients: int, per_client: int
) -> float:
    errors: list[str] = []

    def run() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            for _ in range(per_client):
                response = client.post(
                    "/predict", data={"job_id": job_id}, files=[("files", ("b.jpg", payload))]
                )
                if response.status_code != 200:
                    errors.append(response.text)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return clients * per_client / elapsed


def _in_process(checkpoint: str, image_file: Path, n: int) -> dict[str, Any]:
    """Run this module with --in-process in a fresh interpreter and read its JSON answer."""
    env = {**os.environ, "CRASH_HANDLER": "FALSE", "CONSOLE_LOG_LEVEL": "ERROR"}
    env["SUPER_GRADIENTS_LOG_DIR"] = str(image_file.parent / "sg_logs")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.predict_latency",
            "--in-process",
            checkpoint,
            str(image_file),
            "-n",
            str(n),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def in_process_main(checkpoint: str, image_file: str, n: int) -> None:
    """The in-process side: `model.predict` as the seed calls it, then one held fused pipeline."""
    from app.ml.inference import build_pipeline, load_model, set_thresholds
    from app.ml.types import DEFAULT_CONF, DEFAULT_IOU

    image = np.asarray(Image.open(image_file).convert("RGB"))
    model, _ = load_model("yolo_nas_s", Path(checkpoint))
    result: dict[str, Any] = {}

    def timed(fn: Any) -> list[float]:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return samples

    result["predict_fuse_false"] = _stats(
        timed(lambda: model.predict(image, conf=DEFAULT_CONF, iou=DEFAULT_IOU, fuse_model=False))
    )
    pipeline = build_pipeline(model)
    set_thresholds(pipeline, conf=DEFAULT_CONF, iou=DEFAULT_IOU)
    result["held_fused_pipeline"] = _stats(timed(lambda: pipeline([image], batch_size=1)))
    sys.__stdout__.write("RESULT " + json.dumps(result) + "\n")  # SG replaced sys.stdout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="use a running service instead of starting one")
    parser.add_argument("--job", help="a succeeded job id on that service (else one is trained)")
    parser.add_argument(
        "--key", default=os.environ.get("SGJOBS_API_KEY"), help="API key for --url (default: $SGJOBS_API_KEY)"
    )
    parser.add_argument("-n", type=int, default=60, help="sequential requests / calls per measurement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=25)
    parser.add_argument("--size", default="320x240", help="image WxH")
    parser.add_argument("--input-size", type=int, default=64, help="training input size when training")
    parser.add_argument("--markdown", type=Path, help="append the markdown section to this file")
    parser.add_argument("--in-process", nargs=2, metavar=("CHECKPOINT", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        in_process_main(args.in_process[0], args.in_process[1], args.n)
        return 0

    width, height = (int(v) for v in args.size.lower().split("x"))
    image = _image(width, height)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    payload = buffer.getvalue()
    work = Path(tempfile.mkdtemp(prefix="sgjobs-bench-"))
    image_file = work / "bench.jpg"
    image_file.write_bytes(payload)
    with ExitStack() as stack:
        url = args.url
        headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
        if url is None:
            # SQLite in a fresh home (absolute), the CPU, quiet logs; stopped with the whole tree.
            backend = stack.enter_context(backend_resources("sqlite", prefix="sgjobs-bench"))
            settings = {"device": "cpu", "log_level": "warning"}
            running = stack.enter_context(serve(backend, work, cwd=ROOT, settings=settings))
            url, headers = running.base_url, running.headers
        client = httpx.Client(base_url=url, headers=headers, timeout=300)
        job_id = args.job or _train(client, work, args.input_size)
        job = client.get(f"/jobs/{job_id}").json()
        input_size = job["spec"]["input_size"]
        checkpoint = job["artifacts"]["ckpt_best"]
        print("warming up...", file=sys.stderr)
        _http_latency(client, job_id, payload, 5)
        print(f"{args.n} warm /predict requests...", file=sys.stderr)
        http = _stats(_http_latency(client, job_id, payload, args.n))
        stats = client.get("/predict/stats").json()
        print(f"{args.clients} concurrent clients...", file=sys.stderr)
        throughput = _throughput(url, headers, job_id, payload, args.clients, args.per_client)
        single = _throughput(url, headers, job_id, payload, 1, args.per_client)
        print("in-process predict...", file=sys.stderr)
        local = _in_process(checkpoint, image_file, args.n)

    seed, held = local["predict_fuse_false"], local["held_fused_pipeline"]
    load = os.getloadavg()
    lines = [
        "## Prediction latency",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} CPU cores, no GPU, "
        f"{platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        " (other jobs shared the machine).",
        f"Command: `.venv/bin/python -m bench.predict_latency {' '.join(sys.argv[1:])}`".rstrip() + ".",
        f"Model: YOLO-NAS-S trained through the API at {input_size[0]}x{input_size[1]} px; "
        f"one {width}x{height} "
        f"JPEG ({len(payload) / 1000:.0f} kB); conf 0.25, iou 0.65; n = {args.n} each, after warm-up; "
        f"model loads during the run: {stats['model_loads']}.",
        "",
        "| one image | median ms | p95 ms | ratio to in-process `predict` (median / p95) |",
        "| --- | ---: | ---: | ---: |",
        f"| `POST /predict` over HTTP (warm, JSON) | {http['median_ms']:.1f} | {http['p95_ms']:.1f} | "
        f"{http['median_ms'] / seed['median_ms']:.2f} / {http['p95_ms'] / seed['p95_ms']:.2f} |",
        f"| in-process `model.predict(fuse_model=False)` (the seed) | {seed['median_ms']:.1f} | "
        f"{seed['p95_ms']:.1f} | 1.00 / 1.00 |",
        f"| in-process, one held fused pipeline (best in-process) | {held['median_ms']:.1f} | "
        f"{held['p95_ms']:.1f} | "
        f"{held['median_ms'] / seed['median_ms']:.2f} / {held['p95_ms'] / seed['p95_ms']:.2f} |",
        "",
        f"HTTP vs the best in-process way: {http['median_ms'] / held['median_ms']:.2f}x median, "
        f"{http['p95_ms'] / held['p95_ms']:.2f}x p95.",
        "",
        f"Throughput: {throughput:.1f} images/s with {args.clients} concurrent clients "
        f"({args.clients} x {args.per_client} requests), {single:.1f} images/s with one client. "
        "The inference process answers one request at a time, so concurrency mostly overlaps HTTP and "
        "decoding with inference.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
