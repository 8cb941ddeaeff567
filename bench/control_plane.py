"""Benchmark 5, control plane under load: API latency while a training runs on the same machine.

    python -m bench.control_plane [--backend sqlite|postgres|both] [--rate R] [--duration S] [--smoke] ...

Per backend: a job is submitted and 100,000 metric points (`--points`) are stored for it straight
through the service's own `app.jobs.lifecycle.add_metrics` (5 series, like a long training's per-batch
losses); the job then trains (it keeps writing its own points every 0.5 s). Once its first batch
has ended, a small open-loop asyncio + httpx client sends, each at `--rate` requests/s for
`--duration` s:

* GET /jobs/{id} (the running job: status, progress, ETA);
* GET /jobs/{id}/metrics?cursor=<latest next_cursor> (an incremental poll; it starts 100 points
  before the end of the stored 100,000 and follows next_cursor like a dashboard).

Each round runs twice, back to back in alternating order, on the same job and database: against the
service (every request checks its `Authorization: Bearer` key) and against `bench.open_api`, the
same app with the key check taken out, so the table shows what authentication costs.

Requests are scheduled at fixed times; latency is measured from the scheduled time to the end of
the response (so a stalled server cannot hide queueing delay). Reported: p50/p95/p99/max and
errors (non-200 or transport errors). Targets: p95 < 50 ms, no errors. The load client runs on the
same machine and competes for the same CPUs. `--repeats` repeats the load phase on the same job.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.testing import free_port
from bench.harness import (
    BenchError,
    Size,
    build_parser,
    finish,
    fmt,
    make_dataset,
    markdown_table,
    median,
    parse_options,
    percentile,
    remove_job_dir,
    service_env,
    services,
    target,
    workspace,
)
from bench.harness import job_spec as make_job_spec
from bench.job_start import first_batch

DEFAULTS = Size(images=64, val_images=16, input_size=64, epochs=100, batch_size=8, repeats=2)
SMOKE = Size(images=16, val_images=8, input_size=64, epochs=50, batch_size=8, repeats=1)
SERIES = (
    "Batch_PPYoloELoss/loss_cls",
    "Batch_PPYoloELoss/loss_iou",
    "Batch_PPYoloELoss/loss_dfl",
    "Batch_PPYoloELoss/loss",
    "Batch_LR",
)


def store_points(service: Any, job_id: str, count: int, chunk: int = 5000) -> tuple[float, int]:
    """Insert `count` points for the job with the service's own add_metrics; returns (seconds, max id)."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.jobs import lifecycle as jobs
    from app.jobs.models import Metric
    from app.ml.types import MetricPoint

    url = service.settings().database_url
    start = time.monotonic()
    base = datetime.now(UTC) - timedelta(hours=6)
    steps = count // len(SERIES) + 1
    written = 0
    for first in range(0, steps, chunk // len(SERIES)):
        points = []
        for step in range(first, min(steps, first + chunk // len(SERIES))):
            for name in SERIES:
                if written + len(points) >= count:
                    break
                points.append(
                    MetricPoint(
                        name,
                        1.0 / (1 + step),
                        epoch=step // 1000,
                        step=step,
                        time=base + timedelta(milliseconds=200 * step),
                    )
                )
        if not points:
            break
        with session_scope(url) as session:
            jobs.add_metrics(session, job_id=job_id, points=points)
        written += len(points)
    with session_scope(url) as session:
        max_id = session.scalar(select(func.max(Metric.id)).where(Metric.job_id == job_id))
    return time.monotonic() - start, int(max_id or 0)


async def drive(
    base_url: str, headers: dict[str, str], job_id: str, cursor: int, rate: float, duration: float
) -> dict[str, list[Any]]:
    """Open-loop load on two endpoints; returns latencies (s) and errors per endpoint."""
    state = {"cursor": str(cursor)}
    out: dict[str, list[Any]] = {"job": [], "metrics": [], "job_errors": [], "metrics_errors": []}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10, limits=limits) as client:

        async def one(kind: str, scheduled: float) -> None:
            try:
                if kind == "job":
                    r = await client.get(f"/jobs/{job_id}")
                else:
                    r = await client.get(f"/jobs/{job_id}/metrics", params={"cursor": state["cursor"]})
                if r.status_code != 200:
                    out[f"{kind}_errors"].append(f"HTTP {r.status_code}")
                    return
                if kind == "metrics":
                    nxt = r.json().get("next_cursor")
                    if nxt and int(nxt) > int(state["cursor"]):
                        state["cursor"] = nxt
                out[kind].append(time.perf_counter() - scheduled)
            except httpx.HTTPError as exc:
                out[f"{kind}_errors"].append(type(exc).__name__)

        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter() + 0.2
        n = int(rate * duration)
        # Interleave the two request streams, half a period apart.
        schedule = sorted(
            [(start + i / rate, "job") for i in range(n)]
            + [(start + (i + 0.5) / rate, "metrics") for i in range(n)]
        )
        for at, kind in schedule:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(kind, at)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return out


# The two ways each round is run: label, and whether requests carry the service's key.
AUTH_MODES = (("auth on", True), ("auth off", False))


@contextmanager
def open_api(service: Any, datasets_dir: Any, device: str) -> Iterator[str]:
    """`bench.open_api` (the API without the key check) on the service's database; yields its URL."""
    port = free_port()
    env = service_env(service.backend, service.home, datasets_dir, device)
    proc = subprocess.Popen([sys.executable, "-m", "bench.open_api", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"bench.open_api did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    parser.add_argument("--rate", type=float, help="requests/s per endpoint (default 25; smoke 10)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 15; smoke 5)")
    parser.add_argument("--points", type=int, default=100_000, help="metric points stored for the job")
    opts, args = parse_options(parser, DEFAULTS, SMOKE)
    size = opts.size
    rate = args.rate or (10.0 if opts.smoke else 25.0)
    duration = args.duration or (5.0 if opts.smoke else 15.0)
    results: dict[str, Any] = {}
    rows = []
    with workspace(opts, "control") as work:
        datasets_dir = work / "datasets"
        dataset = make_dataset(datasets_dir, size)
        with services(opts.backends, work, datasets_dir, size.device) as svc:
            for name, service in svc.items():
                print(f"{name}: storing {args.points} points", file=sys.stderr, flush=True)
                job = service.submit(make_job_spec(dataset, size, f"control-{name}"))
                rounds: dict[str, list[dict[str, list[Any]]]] = {mode: [] for mode, _ in AUTH_MODES}
                try:
                    insert_s, max_id = store_points(service, job["id"], args.points)
                    with open_api(service, datasets_dir, size.device) as open_url:
                        first_batch(service, job["id"])
                        for round_ in range(size.repeats):
                            # Alternate which mode goes first, so drift in the training's load
                            # does not favour one of them.
                            order = AUTH_MODES if round_ % 2 == 0 else AUTH_MODES[::-1]
                            for mode, keyed in order:
                                print(
                                    f"{name}: load round {round_ + 1}/{size.repeats}, {mode}",
                                    file=sys.stderr,
                                    flush=True,
                                )
                                if service.job(job["id"])["status"] != "running":
                                    raise BenchError("the training job is no longer running; raise --epochs")
                                url, headers = (
                                    (service.base_url, service.headers) if keyed else (open_url, {})
                                )
                                load = drive(url, headers, job["id"], max_id - 100, rate, duration)
                                rounds[mode].append(asyncio.run(load))
                        if service.job(job["id"])["status"] != "running":
                            raise BenchError("the training ended during the load; raise --epochs")
                finally:
                    done = service.stop_job(job["id"])
                    remove_job_dir(done)
                results[name] = {"insert_s": insert_s, "stored_points": args.points, "rounds": rounds}
                for kind, label in (("job", "GET /jobs/{id}"), ("metrics", "GET /jobs/{id}/metrics?cursor=")):
                    p95s = {}
                    for mode, _ in AUTH_MODES:
                        lat = [x * 1000 for r in rounds[mode] for x in r[kind]]
                        errors = sum(len(r[f"{kind}_errors"]) for r in rounds[mode])
                        p95 = p95s[mode] = percentile(lat, 95)
                        results[name][f"{kind} {mode}"] = {
                            "requests": len(lat) + errors,
                            "errors": errors,
                            "p50_ms": percentile(lat, 50),
                            "p95_ms": p95,
                            "p99_ms": percentile(lat, 99),
                            "max_ms": max(lat) if lat else None,
                            "median_ms": median(lat),
                        }
                        rows.append(
                            [
                                name,
                                label,
                                mode,
                                len(lat) + errors,
                                fmt(percentile(lat, 50), 1),
                                fmt(p95, 1),
                                fmt(percentile(lat, 99), 1),
                                fmt(max(lat) if lat else None, 1),
                                errors,
                                target(p95 < 50 and errors == 0),
                            ]
                        )
                    on, off = p95s["auth on"], p95s["auth off"]
                    results[name][f"{kind} p95 auth on / off"] = on / off if on and off else None
    table = markdown_table(
        [
            "backend",
            "request",
            "keys",
            "requests",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "errors",
            "p95 < 50 ms, no errors",
        ],
        rows,
    )
    finish(
        "Control plane under load",
        opts,
        table,
        {"rate_per_endpoint": rate, "duration_s": duration, **results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
