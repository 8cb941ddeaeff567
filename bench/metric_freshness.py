"""Benchmark 3, metric freshness: from a value produced in training to it being readable over HTTP.

    python -m bench.metric_freshness [--backend sqlite|postgres|both] [--repeats N] [--smoke] ...

While a job trains, the harness polls GET /jobs/{id}/metrics?cursor=<next_cursor> on a fixed 50 ms
schedule. For every new point, freshness = the wall-clock time the poll's response arrived minus the
point's `time` (stamped in the training process when the value was produced: batch end for
`Batch_*`, the SG logger call for per-epoch series). The poll period adds up to 50 ms. Reported per
backend: median, p95 and max over all points of all repeats (and per kind: per batch / per epoch).
Target: under 1 s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.harness import (
    TERMINAL,
    BenchError,
    Size,
    build_parser,
    finish,
    fmt,
    make_dataset,
    markdown_table,
    median,
    parse_options,
    parse_time,
    percentile,
    remove_job_dir,
    services,
    target,
    workspace,
)
from bench.harness import job_spec as make_job_spec

DEFAULTS = Size(images=64, val_images=16, input_size=64, epochs=3, batch_size=8, repeats=2)
SMOKE = Size(images=16, val_images=8, input_size=64, epochs=2, batch_size=8, repeats=1)
POLL_SECONDS = 0.05


def poll_freshness(service: Any, job_id: str, timeout: float = 1800) -> list[dict[str, Any]]:
    """Follow the job's metrics until it ends; one record (name, kind, freshness) per new point."""
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    deadline = time.monotonic() + timeout
    next_poll = time.monotonic()
    last_status_check = 0.0
    while time.monotonic() < deadline:
        params: dict[str, Any] = {"limit": 10000}
        if cursor:
            params["cursor"] = cursor
        r = service.client.get(f"/jobs/{job_id}/metrics", params=params)
        arrived = time.time()
        if r.status_code != 200:
            raise BenchError(f"metrics poll answered {r.status_code}: {r.text[:300]}")
        page = r.json()
        for p in page["items"]:
            seen.append(
                {
                    "name": p["name"],
                    "kind": "batch" if p["name"].startswith("Batch_") else "epoch",
                    "freshness_s": arrived - parse_time(p["time"]),
                }
            )
        cursor = page["next_cursor"]
        if time.monotonic() - last_status_check > 1.0:
            last_status_check = time.monotonic()
            if service.job(job_id)["status"] in TERMINAL:
                # Points written after the last poll are not measured (this check's cadence, not the
                # service's, would decide their freshness).
                return seen
        next_poll += POLL_SECONDS
        time.sleep(max(0.0, next_poll - time.monotonic()))
    raise BenchError(f"job {job_id} did not finish within {timeout}s")


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    opts, _ = parse_options(parser, DEFAULTS, SMOKE)
    size = opts.size
    runs: dict[str, list[list[dict[str, Any]]]] = {b: [] for b in opts.backends}
    with workspace(opts, "freshness") as work:
        datasets_dir = work / "datasets"
        dataset = make_dataset(datasets_dir, size)
        with services(opts.backends, work, datasets_dir, size.device) as svc:
            for round_ in range(size.repeats):
                for name, service in svc.items():
                    print(f"round {round_ + 1}/{size.repeats}: {name}", file=sys.stderr, flush=True)
                    job = service.submit(make_job_spec(dataset, size, f"freshness-{name}-{round_}"))
                    points = poll_freshness(service, job["id"])
                    done = service.wait(job["id"], timeout=120)
                    if done["status"] != "succeeded":
                        raise BenchError(f"job {job['id']} {done['status']}: {done.get('error')}")
                    runs[name].append(points)
                    remove_job_dir(done)

    rows = []
    summary: dict[str, Any] = {"stats": {}}
    for name, rounds in runs.items():
        for kind in ("all", "batch", "epoch"):
            values = [p["freshness_s"] for pts in rounds for p in pts if kind == "all" or p["kind"] == kind]
            per_round = [
                median([p["freshness_s"] for p in pts if kind == "all" or p["kind"] == kind])
                for pts in rounds
            ]
            stats = {
                "points": len(values),
                "median_s": median(values),
                "p95_s": percentile(values, 95),
                "max_s": max(values) if values else float("nan"),
                "median_per_round_s": per_round,
            }
            summary["stats"][f"{name}/{kind}"] = stats
            rows.append(
                [
                    name,
                    kind,
                    stats["points"],
                    fmt(stats["median_s"], 3),
                    fmt(stats["p95_s"], 3),
                    fmt(stats["max_s"], 3),
                    ", ".join(fmt(x, 3) for x in per_round),
                    target(stats["p95_s"] < 1.0) if values else "",
                ]
            )
    table = markdown_table(
        ["backend", "points", "n", "median s", "p95 s", "max s", "median per round s", "p95 < 1 s"], rows
    )
    finish("Metric freshness", opts, table, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
