"""/predict throughput and latency with 1 client and with 8 concurrent clients (issue 13's target:
8 clients >= 2x one client's requests/s).

    .venv/bin/python -m bench.predict_throughput                  # starts `sgjobs serve`, trains a tiny model
    .venv/bin/python -m bench.predict_throughput --url http://127.0.0.1:8000 --job <id>

Each client sends one-image requests back to back for `--seconds`; every run starts after a warm-up.
With a started service, the same runs are repeated with batching off (`predict_max_batch_images=1`:
requests still overlap in the inference process, but each has a forward pass of its own), to show
what merging adds. Prints a markdown section (appended to --markdown FILE if given).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.testing import backend_resources, serve
from bench import harness
from bench.predict_latency import _image, _train

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    clients: int
    requests: int
    seconds: float
    latencies: list[float]
    merged: int
    batches: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def _run(url: str, headers: dict[str, str], job_id: str, payload: bytes, clients: int, seconds: float) -> Run:
    """`clients` threads sending one-image requests back to back for `seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stats_client = httpx.Client(base_url=url, headers=headers, timeout=60)
    before = stats_client.get("/predict/stats").json()
    start = time.perf_counter()
    stop_at = start + seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                response = client.post(
                    "/predict", data={"job_id": job_id}, files=[("files", ("bench.jpg", payload))]
                )
                took = time.perf_counter() - sent
                with lock:
                    if response.status_code == 200:
                        latencies.append(took)
                    else:
                        errors.append(f"{response.status_code} {response.text[:300]}")

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    after = stats_client.get("/predict/stats").json()
    stats_client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return Run(
        clients=clients,
        requests=len(latencies),
        seconds=elapsed,
        latencies=latencies,
        merged=after.get("merged_requests", 0) - before.get("merged_requests", 0),
        batches=after.get("batches", 0) - before.get("batches", 0),
    )


def _measure(
    url: str, headers: dict[str, str], job_id: str, payload: bytes, clients: list[int], seconds: float
) -> list[Run]:
    _run(url, headers, job_id, payload, max(clients), min(seconds, 3.0))  # warm-up: model loaded, threads up
    runs = []
    for count in clients:
        print(f"{count} client(s) for {seconds:.0f} s...", file=sys.stderr)
        runs.append(_run(url, headers, job_id, payload, count, seconds))
    return runs


def _table(title: str, runs: list[Run]) -> list[str]:
    base = runs[0].throughput
    lines = [
        f"{title}",
        "",
        "| clients | requests | req/s | vs 1 client | p50 ms | p95 ms | requests merged / forward passes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {run.clients} | {run.requests} | {run.throughput:.1f} | {run.throughput / base:.2f}x | "
            f"{run.percentile(0.5):.0f} | {run.percentile(0.95):.0f} | {run.merged} / {run.batches} |"
        )
    return [*lines, ""]


def main() -> int:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_service_args(parser)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured run")
    parser.add_argument("--clients", type=int, default=8, help="the concurrent run's clients")
    parser.add_argument("--size", default="320x240", help="image WxH")
    parser.add_argument("--input-size", type=int, default=64, help="training input size when training")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the run with batching off")
    parser.add_argument("--markdown", type=Path, help="append the markdown section to this file")
    args = parser.parse_args()

    width, height = (int(v) for v in args.size.lower().split("x"))
    buffer = io.BytesIO()
    Image.fromarray(_image(width, height)).save(buffer, format="JPEG", quality=90)
    payload = buffer.getvalue()
    clients = [1, args.clients]
    results: dict[str, list[Run]] = {}
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sgjobs-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        if args.url is not None:
            headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
            client = stack.enter_context(httpx.Client(base_url=args.url, headers=headers, timeout=300))
            job_id = args.job or _train(client, work, args.input_size)
            results["as configured"] = _measure(args.url, headers, job_id, payload, clients, args.seconds)
        else:
            # SQLite in a fresh home; the same home (and trained job) for both services.
            backend = stack.enter_context(backend_resources("sqlite", prefix="sgjobs-bench"))
            job_id = args.job
            variants: dict[str, dict[str, object]] = {"batching on (defaults)": {}}
            if not args.no_unbatched:
                variants["batching off (predict_max_batch_images=1)"] = {"predict_max_batch_images": 1}
            for title, extra in variants.items():
                settings = {"device": "cpu", "log_level": "warning", **extra}
                with serve(backend, work / "home", cwd=ROOT, settings=settings) as running:
                    with httpx.Client(
                        base_url=running.base_url, headers=running.headers, timeout=300
                    ) as client:
                        job_id = job_id or _train(client, work / "home", args.input_size)
                        info["input_size"] = client.get(f"/jobs/{job_id}").json()["spec"]["input_size"]
                    results[title] = _measure(
                        running.base_url, running.headers, job_id, payload, clients, args.seconds
                    )

    load = os.getloadavg()
    size = info.get("input_size")
    lines = [
        "## Prediction throughput with concurrent clients",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPU cores, "
        f"no GPU, Python {platform.python_version()}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared the machine).",
        f"Command: `.venv/bin/python -m bench.predict_throughput {' '.join(sys.argv[1:])}`".rstrip() + ".",
        f"Model: YOLO-NAS-S trained through the API{f' at {size[0]}x{size[1]} px' if size else ''}; one "
        f"{width}x{height} JPEG per request ({len(payload) / 1000:.0f} kB), conf 0.25, iou 0.65; each run "
        f"{args.seconds:.0f} s of back-to-back requests per client, after a warm-up.",
        "",
    ]
    for title, runs in results.items():
        lines += _table(f"**{title}**", runs)
    harness.emit("\n".join(lines), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
