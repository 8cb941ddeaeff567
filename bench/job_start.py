"""Benchmark 4, job start latency: POST /jobs to the end of the first training batch, on a warm worker.

    python -m bench.job_start [--backend sqlite|postgres|both] [--repeats N] [--smoke] ...

The worker is warmed up by one job that runs to its first batch. Then, per repeat, the harness
waits until the worker's fork server (`worker.standby`) has imported everything and a child of it
waits for a job (at most `SPARE_WAIT_S`; a start without one is cold, and counted so), POSTs a job
(time taken just before the POST) and follows it to its first `Batch_PPYoloELoss/loss` point,
whose `time` is stamped at the end of the first batch in the training process; then it cancels the
job and waits for it to end. The total is split with the job's events:

* queue + claim: POST until the "attempt 1 running on <worker>" event (written by the worker's claim);
* dataset: until the "dataset ready" event (training process start, dataset validation/indexing);
* SG import + model: until the "training <model> on <device>" event (imported, unless the fork server
  had imported already; datasets and model built, right before Trainer.train);
* first batch: until the first batch ended (SG's set-up in train() and the batch itself).

It also reports claim -> end of the first batch (the issue's warm-start figure: the last three
phases together, from the worker's claim event to the end of the first batch).

Events written by the training process carry the time they were written, which is up to one report
interval (0.5 s) after they happened; the split is that coarse, the total is exact.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.harness import (
    BATCH_LOSS,
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
    remove_job_dir,
    services,
    wait_for_spare,
    workspace,
)
from bench.harness import job_spec as make_job_spec

DEFAULTS = Size(images=96, val_images=16, input_size=64, epochs=2, batch_size=8, repeats=3)
SMOKE = Size(images=16, val_images=8, input_size=64, epochs=2, batch_size=8, repeats=1)
PHASES: tuple[tuple[str, str], ...] = (
    ("queue_claim_s", "attempt 1 running on "),
    ("dataset_s", "dataset ready"),
    ("sg_import_model_s", "training "),
)


def first_batch(service: Any, job_id: str, timeout: float = 600) -> float:
    """POSIX time of the job's first per-batch point (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = service.client.get(f"/jobs/{job_id}/metrics", params={"name": BATCH_LOSS, "limit": 1})
        if r.status_code == 200 and r.json()["items"]:
            return parse_time(r.json()["items"][0]["time"])
        job = service.job(job_id)
        if job["status"] in ("failed", "cancelled", "succeeded"):
            r = service.client.get(f"/jobs/{job_id}/metrics", params={"name": BATCH_LOSS, "limit": 1})
            if r.status_code == 200 and r.json()["items"]:
                return parse_time(r.json()["items"][0]["time"])
            raise BenchError(
                f"job {job_id} ended ({job['status']}, {job.get('error')}) before its first batch"
            )
        time.sleep(0.05)
    raise BenchError(f"job {job_id} had no batch after {timeout}s")


def one_start(service: Any, dataset: Any, size: Size, label: str) -> dict[str, Any]:
    spare_ready = wait_for_spare(service)
    posted = time.time()
    job = service.submit(make_job_spec(dataset, size, f"start-{label}"))
    first = first_batch(service, job["id"])
    done = service.stop_job(job["id"])
    events = service.events(job["id"])
    marks: dict[str, float] = {}
    for key, prefix in PHASES:
        found = [parse_time(e["time"]) for e in events if e["message"].startswith(prefix)]
        if prefix == "training ":
            found = [
                parse_time(e["time"]) for e in events if e["message"].startswith(f"training {size.model} on")
            ]
        if not found:
            raise BenchError(f"job {job['id']} has no event starting with {prefix!r}")
        marks[key] = found[0]
    warm = any((e.get("data") or {}).get("standby") for e in events)
    result: dict[str, Any] = {
        "job_id": job["id"],
        "total_s": first - posted,
        "spare_ready": spare_ready,
        "warm": warm,
    }
    previous = posted
    for key, _ in PHASES:
        result[key] = marks[key] - previous
        previous = marks[key]
    result["first_batch_s"] = first - previous
    # The figure: from the claim (written by the worker as it claims) to the first batch's end.
    result["claim_to_first_batch_s"] = first - marks["queue_claim_s"]
    remove_job_dir(done)
    return result


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    opts, _ = parse_options(parser, DEFAULTS, SMOKE)
    size = opts.size
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in opts.backends}
    with workspace(opts, "start") as work:
        datasets_dir = work / "datasets"
        dataset = make_dataset(datasets_dir, size)
        with services(opts.backends, work, datasets_dir, size.device) as svc:
            for name, service in svc.items():
                print(f"warm-up: {name}", file=sys.stderr, flush=True)
                one_start(service, dataset, size, f"{name}-warmup")
            for round_ in range(size.repeats):
                for name, service in svc.items():
                    print(f"round {round_ + 1}/{size.repeats}: {name}", file=sys.stderr, flush=True)
                    runs[name].append(one_start(service, dataset, size, f"{name}-{round_}"))

    keys = ["total_s", *(k for k, _ in PHASES), "first_batch_s", "claim_to_first_batch_s"]
    rows = []
    summary: dict[str, Any] = {"runs": runs, "medians": {}}
    for name, results in runs.items():
        meds = {k: median([r[k] for r in results]) for k in keys}
        summary["medians"][name] = meds
        warm = sum(1 for r in results if r["warm"] and r["spare_ready"])
        rows.append(
            [
                name,
                *(fmt(meds[k]) for k in keys),
                f"{warm}/{len(results)}",
                ", ".join(fmt(r["total_s"]) for r in results),
                ", ".join(fmt(r["claim_to_first_batch_s"]) for r in results),
            ]
        )
    table = markdown_table(
        [
            "backend",
            "total s",
            "queue + claim s",
            "dataset s",
            "SG import + model s",
            "first batch s",
            "claim -> end of first batch s",
            "warm starts",
            "total per run s",
            "claim -> end of first batch per run s",
        ],
        rows,
    )
    finish("Job start latency", opts, table, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
