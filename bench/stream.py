"""Benchmark: live feeds (`GET /jobs/{id}/stream`): stream latency, and what 100 open streams cost
the control plane.

    python -m bench.stream [--backend sqlite|postgres|both] [--streams N] [--duration S] [--smoke] ...

Per backend, on a job inserted as running (no training: the numbers are the feed's, not a training's
CPU load), a writer thread stores one metric point every 1/`--write-rate` s straight through the
service's own `app.jobs.lifecycle.add_metrics`, as the training process does, and notes when each
commit returned. Three phases of `--duration` s, in this order:

* 0 streams: the control plane's open-loop load of `bench.control_plane` (GET /jobs/{id} and
  GET /jobs/{id}/metrics?cursor=, each at `--rate` requests/s), with the writer running;
* 1 stream: stream latency alone, from a point's commit to its `metric` message arriving;
* `--streams` streams (default 100) on the job, the same control-plane load and the writer:
  latency over every stream, and the control plane's p95 beside the first phase's.

The streams are read in a child process (so parsing 100 streams does not delay the load client's
own requests); both processes stamp times with the system-wide monotonic clock. On PostgreSQL the
database's connections (pg_stat_activity) are counted at the end of each phase. The service runs
with its defaults: stream_poll_seconds 0.5, so a point waits up to half a second for the next poll.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

import httpx

from bench.control_plane import drive
from bench.harness import (
    BenchError,
    Size,
    build_parser,
    finish,
    fmt,
    markdown_table,
    parse_options,
    percentile,
    services,
    target,
    workspace,
)

# Only the service settings matter here; the size knobs are the harness's common options.
DEFAULTS = Size(repeats=1)
SMOKE = Size(repeats=1)
SERIES = "bench_stream_latency"
# Stream latency target: one poll interval (0.5 s) plus a little.
LATENCY_P95_TARGET_MS = 750.0
# The control plane's target (as bench.control_plane's), with the streams open too.
PLANE_P95_TARGET_MS = 50.0


def fake_running_job(database_url: str) -> str:
    """A job as a claim leaves it (attempt 1, a day-long lease, so no sweeper takes it), never sent
    to the worker."""
    from app.db import session_scope, utcnow
    from app.jobs import lifecycle
    from app.jobs.models import Job, JobStatus
    from app.jobs.schemas import JobSpec

    spec = JobSpec.model_validate(
        {"name": "bench-stream", "model": "yolo_nas_s", "dataset": {"format": "coco", "path": "unused"}}
    )
    with session_scope(database_url) as session:
        job = Job(
            name=spec.name,
            tenant="default",
            status=JobStatus.running,
            model=spec.model,
            spec=spec.model_dump(mode="json"),
            max_epochs=spec.training.max_epochs,
            best_metric_name=spec.training.metric_to_watch,
            attempt=1,
            worker="bench",
            lease_expires_at=utcnow() + timedelta(days=1),
            created_at=utcnow(),
            started_at=utcnow(),
        )
        session.add(job)
        session.flush()
        lifecycle.add_event(session, job_id=job.id, kind="state", message="running (bench)")
        return job.id


def end_job(database_url: str, job_id: str) -> None:
    from app.db import session_scope
    from app.jobs import lifecycle
    from app.jobs.models import JobStatus

    with session_scope(database_url) as session:
        lifecycle.finish(session, job_id=job_id, status=JobStatus.cancelled, message="benchmark over")


class Writer(threading.Thread):
    """Stores point `seq` (its value) every `interval` s; `committed[seq]` = monotonic time after commit."""

    def __init__(self, database_url: str, job_id: str, interval: float) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.database_url, self.job_id, self.interval = database_url, job_id, interval
        self.committed: dict[int, float] = {}
        self.stop = threading.Event()
        self.seq = 0

    def run(self) -> None:
        from app.db import session_scope
        from app.jobs import lifecycle
        from app.ml.types import MetricPoint

        next_at = time.monotonic()
        while not self.stop.is_set():
            self.seq += 1
            point = MetricPoint(SERIES, float(self.seq), epoch=0, step=self.seq, time=datetime.now(UTC))
            with session_scope(self.database_url) as session:
                lifecycle.add_metrics(session, job_id=self.job_id, points=[point])
            self.committed[self.seq] = time.monotonic()
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))


async def _read_streams(
    base_url: str, headers: dict[str, str], job_id: str, n: int, pipe: Connection
) -> None:
    """Open `n` streams, say "ready" once each has its first status, then note (seq, arrival) of
    every latency point until "stop"; send them back."""
    from app.sse import amessages

    arrivals: list[tuple[int, float]] = []
    limits = httpx.Limits(max_connections=n + 5, max_keepalive_connections=n + 5)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120, limits=limits) as client:

        async def follow(ready: asyncio.Event) -> None:
            async with client.stream("GET", f"/jobs/{job_id}/stream") as response:
                if response.status_code != 200:
                    raise BenchError(f"stream answered {response.status_code}")
                async for message in amessages(response.aiter_lines()):
                    if message.event == "status":
                        ready.set()
                    elif message.event == "metric":
                        point = message.json()
                        if point["name"] == SERIES:
                            arrivals.append((int(point["value"]), time.monotonic()))

        tasks = []
        for _ in range(n):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(follow(ready)))
            await asyncio.wait_for(ready.wait(), timeout=60)
        pipe.send("ready")
        await asyncio.to_thread(pipe.recv)  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(arrivals)


def _reader_process(base_url: str, headers: dict[str, str], job_id: str, n: int, pipe: Connection) -> None:
    asyncio.run(_read_streams(base_url, headers, job_id, n, pipe))


class Readers:
    """`n` streams read in a child process."""

    def __init__(self, base_url: str, headers: dict[str, str], job_id: str, n: int) -> None:
        self.pipe, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_reader_process, args=(base_url, headers, job_id, n, child), daemon=True
        )

    def __enter__(self) -> Readers:
        self.process.start()
        if not self.pipe.poll(120) or self.pipe.recv() != "ready":
            raise BenchError("the streams did not open")
        return self

    def stop(self) -> list[tuple[int, float]]:
        self.pipe.send("stop")
        if not self.pipe.poll(60):
            raise BenchError("the stream reader did not answer")
        arrivals: list[tuple[int, float]] = self.pipe.recv()
        return arrivals

    def __exit__(self, *_: object) -> None:
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def connections(database_url: str) -> int | None:
    """Connections to the service's database (PostgreSQL), None on SQLite."""
    if not database_url.startswith("postgresql"):
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            return int(connection.scalar(text(query)) or 0) - 1  # not this one
    finally:
        engine.dispose()


def latencies_ms(writer: Writer, arrivals: list[tuple[int, float]], since: float) -> list[float]:
    committed = writer.committed
    return [
        (at - committed[seq]) * 1000 for seq, at in arrivals if seq in committed and committed[seq] >= since
    ]


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values) if values else None,
    }


def load(service: Any, job_id: str, rate: float, duration: float) -> dict[str, Any]:
    out = asyncio.run(drive(service.base_url, service.headers, job_id, 0, rate, duration))
    result = {}
    for kind in ("job", "metrics"):
        result[kind] = stats([x * 1000 for x in out[kind]]) | {"errors": len(out[f"{kind}_errors"])}
    return result


def run_backend(service: Any, n: int, rate: float, write_rate: float, duration: float) -> dict[str, Any]:
    url = service.settings().database_url
    job_id = fake_running_job(url)
    writer = Writer(url, job_id, 1 / write_rate)
    writer.start()
    result: dict[str, Any] = {"job_id": job_id}
    try:
        # Warm-up (connections, caches, the first requests' imports), not measured.
        load(service, job_id, rate, 1.0)
        print(f"{service.name}: 0 streams, control-plane load", file=sys.stderr, flush=True)
        result["plane_0"] = load(service, job_id, rate, duration)
        result["connections_0"] = connections(url)

        print(f"{service.name}: 1 stream", file=sys.stderr, flush=True)
        with Readers(service.base_url, service.headers, job_id, 1) as one:
            since = time.monotonic()
            time.sleep(duration)
            result["latency_1"] = stats(latencies_ms(writer, one.stop(), since))

        print(f"{service.name}: {n} streams + control-plane load", file=sys.stderr, flush=True)
        with Readers(service.base_url, service.headers, job_id, n) as many:
            since = time.monotonic()
            result[f"plane_{n}"] = load(service, job_id, rate, duration)
            result[f"connections_{n}"] = connections(url)
            result[f"latency_{n}"] = stats(latencies_ms(writer, many.stop(), since))
    finally:
        writer.stop.set()
        writer.join(timeout=10)
        end_job(url, job_id)
    return result


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    parser.add_argument("--streams", type=int, default=100, help="streams open in the last phase")
    parser.add_argument(
        "--rate", type=float, help="control-plane requests/s per endpoint (default 25; smoke 10)"
    )
    parser.add_argument("--write-rate", type=float, default=5.0, help="metric points written per second")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 15; smoke 3)")
    opts, args = parse_options(parser, DEFAULTS, SMOKE)
    rate = args.rate or (10.0 if opts.smoke else 25.0)
    duration = args.duration or (3.0 if opts.smoke else 15.0)
    n = args.streams
    results: dict[str, Any] = {}
    plane_rows, latency_rows = [], []
    with workspace(opts, "stream") as work:
        datasets_dir = work / "datasets"
        datasets_dir.mkdir()
        with services(opts.backends, work, datasets_dir, opts.size.device) as svc:
            for name, service in svc.items():
                r = results[name] = run_backend(service, n, rate, args.write_rate, duration)
                for streams in (0, n):
                    for kind, label in (
                        ("job", "GET /jobs/{id}"),
                        ("metrics", "GET /jobs/{id}/metrics?cursor="),
                    ):
                        s = r[f"plane_{streams}"][kind]
                        plane_rows.append(
                            [
                                name,
                                streams,
                                label,
                                s["n"] + s["errors"],
                                fmt(s["p50_ms"], 1),
                                fmt(s["p95_ms"], 1),
                                fmt(s["max_ms"], 1),
                                s["errors"],
                                r[f"connections_{streams}"]
                                if r[f"connections_{streams}"] is not None
                                else "n/a",
                                target(s["p95_ms"] < PLANE_P95_TARGET_MS and s["errors"] == 0),
                            ]
                        )
                for streams in (1, n):
                    s = r[f"latency_{streams}"]
                    latency_rows.append(
                        [
                            name,
                            streams,
                            s["n"],
                            fmt(s["p50_ms"], 0),
                            fmt(s["p95_ms"], 0),
                            fmt(s["max_ms"], 0),
                            target(s["n"] > 0 and s["p95_ms"] < LATENCY_P95_TARGET_MS),
                        ]
                    )
    table = (
        markdown_table(
            [
                "backend",
                "open streams",
                "request",
                "requests",
                "p50 ms",
                "p95 ms",
                "max ms",
                "errors",
                "DB connections",
                f"p95 < {PLANE_P95_TARGET_MS:.0f} ms, no errors",
            ],
            plane_rows,
        )
        + "\n\n"
        + markdown_table(
            [
                "backend",
                "open streams",
                "points received",
                "p50 ms",
                "p95 ms",
                "max ms",
                f"p95 < {LATENCY_P95_TARGET_MS:.0f} ms",
            ],
            latency_rows,
        )
    )
    finish(
        "Live feeds: stream latency and the cost of open streams",
        opts,
        table,
        {
            "streams": n,
            "rate_per_endpoint": rate,
            "write_rate": args.write_rate,
            "duration_s": duration,
            **results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
