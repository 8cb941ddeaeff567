"""Benchmark 6, recovery: how long a job is down after its worker dies, and how much work is lost.

    python -m bench.recovery [--backend sqlite|postgres|both] [--repeats N] [--lease-seconds S] [--smoke]

A job of a few epochs runs; in the middle of epoch 2 (0-based epoch 1, after half its batches) the
harness strikes it one of three ways:

* kill -9 of the worker (and so of its training process): only the lease can tell; the job is
  resumed once the lease expires and a sweeper sees it (`serve` starts the worker again at once);
* kill -9 of the training process only: its supervising worker sees the exit and queues it at once;
* SIGTERM of the worker (a deploy, a spot reclaim): the worker hands the job back before it exits.

Measured from the strike (wall clock of this machine, the same clock the training process stamps
its points with):

* recovery s: until the first training batch of the resumed attempt ends (its first per-batch point);
* attempt over s: until the service knew the attempt was over (its "lost" or "handed back" event):
  the lease for a kill -9 of the worker, at once for the other two;
* work lost: batches of the interrupted epoch that are trained again (per-batch points superseded),
  and the same in seconds of training (batches x median batch time).

Targets: at most one epoch's work lost (by design: checkpoints are per epoch); recovery after kill -9
of the worker <= lease + sweep interval + one training start (the start, measured as the time from
the claim to the first batch, is reported too).
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from typing import Any

import psutil

from app import testing
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
    target,
    workspace,
)
from bench.harness import job_spec as make_job_spec

DEFAULTS = Size(images=48, val_images=8, input_size=64, epochs=3, batch_size=4, repeats=3)
# Three epochs even in the smoke run: a strike in the middle of epoch 1 must leave a whole epoch to
# resume (with two, a fast machine can finish the job between the wait and the signal).
SMOKE = Size(images=16, val_images=4, input_size=64, epochs=3, batch_size=4, repeats=1)
STRIKES = ("kill -9 worker", "kill -9 training", "SIGTERM worker")
# The service settings that decide recovery time (the rest stay at their defaults).
DEFAULT_LEASE_S = 30.0
SMOKE_LEASE_S = 4.0
SWEEP_INTERVAL_S = 2.0


def _trainer(job_id: str) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "worker.train_process" in cmdline and job_id in cmdline:
            return proc
    raise BenchError(f"no training process for job {job_id}")


def strike(service: Any, dataset: Any, size: Size, how: str, label: str) -> dict[str, Any]:
    """Run a job, strike it in the middle of epoch 1, and measure its recovery."""
    job = service.submit(make_job_spec(dataset, size, f"recovery-{label}"))
    job_id = job["id"]
    running = service.wait(
        job_id,
        until=lambda j: (
            j["status"] == "running"
            and (j["progress"]["epoch"] or 0) >= 1
            and (j["progress"]["batch"] or 0) >= max(1, (j["progress"]["batches_per_epoch"] or 2) // 2)
        ),
        timeout=900,
        interval=0.05,
    )
    worker_pid = testing.worker_process(running["worker"])
    if worker_pid is None:
        raise BenchError(f"no worker process named {running['worker']}")
    struck = time.time()
    if how == "kill -9 worker":
        os.kill(worker_pid, signal.SIGKILL)
    elif how == "kill -9 training":
        _trainer(job_id).kill()
    else:
        os.kill(worker_pid, signal.SIGTERM)
    done = service.wait(job_id, timeout=900, interval=0.2)
    if done["status"] != "succeeded":
        for event in service.events(job_id):
            print(f"  {event['time']} {event['kind']}: {event['message']}", file=sys.stderr)
        raise BenchError(f"job {job_id} ended {done['status']} after {how}: {done.get('error')}")
    if done["attempt"] == 1:
        raise BenchError(f"job {job_id} finished before the {how} took effect; make it longer (--epochs)")
    points = service.metrics(job_id, names=[BATCH_LOSS])
    ends = sorted(parse_time(p["time"]) for p in points)
    after = [t for t in ends if t > struck]
    if not after:
        raise BenchError(f"no batch after the strike for job {job_id}")
    events = service.events(job_id)
    claims = [parse_time(e["time"]) for e in events if e["message"].startswith("attempt 2 running on")]
    # When the service knew attempt 1 was over: its "lost" (lease expired, process killed) or
    # "handed back" event, written by the sweeper or the worker the moment it found out.
    ended = [
        parse_time(e["time"])
        for e in events
        if e["kind"] == "state"
        and e["message"].startswith("attempt 1 ")
        and ("lost" in e["message"] or "handed back" in e["message"])
    ]
    # Batches of the interrupted epoch before the strike: their points were superseded by the resume.
    lost = int(running["progress"]["batch"] or 0)
    before = [t for t in ends if t <= struck]
    gaps = [b - a for a, b in zip(before, before[1:], strict=False)]
    batch_s = statistics.median(gaps) if gaps else float("nan")
    result = {
        "job_id": job_id,
        "recovery_s": after[0] - struck,
        "detected_s": ended[0] - struck if ended else None,
        "claim_to_first_batch_s": after[0] - claims[0] if claims else None,
        "batches_lost": lost,
        "work_lost_s": lost * batch_s,
        "batches_per_epoch": done["progress"]["batches_per_epoch"],
        "restarts": done["restarts"],
        "attempts": done["attempt"],
    }
    remove_job_dir(done)
    return result


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    parser.add_argument(
        "--lease-seconds", type=float, help=f"default {DEFAULT_LEASE_S} (smoke {SMOKE_LEASE_S})"
    )
    opts, args = parse_options(parser, DEFAULTS, SMOKE)
    size = opts.size
    lease = args.lease_seconds or (SMOKE_LEASE_S if opts.smoke else DEFAULT_LEASE_S)
    settings = {"lease_seconds": lease, "sweep_interval_seconds": SWEEP_INTERVAL_S}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: {s: [] for s in STRIKES} for b in opts.backends}
    with workspace(opts, "recovery") as work:
        datasets_dir = work / "datasets"
        dataset = make_dataset(datasets_dir, size)
        with services(opts.backends, work, datasets_dir, size.device, settings) as svc:
            for round_ in range(size.repeats):
                for name, service in svc.items():
                    for how in STRIKES:
                        print(
                            f"round {round_ + 1}/{size.repeats}: {name}, {how}", file=sys.stderr, flush=True
                        )
                        label = f"{name}-{round_}-{how.replace(' ', '')}"
                        runs[name][how].append(strike(service, dataset, size, how, label))
                        # serve restarts its worker after a kill or a SIGTERM; wait for it to take jobs.
                        time.sleep(2.0)

    rows = []
    summary: dict[str, Any] = {
        "runs": runs,
        "lease_seconds": lease,
        "sweep_interval_seconds": SWEEP_INTERVAL_S,
    }
    for name, by_strike in runs.items():
        for how, results in by_strike.items():
            recovery = median([r["recovery_s"] for r in results])
            detected = [r["detected_s"] for r in results if r["detected_s"] is not None]
            start = [r["claim_to_first_batch_s"] for r in results if r["claim_to_first_batch_s"] is not None]
            lost = median([r["batches_lost"] for r in results])
            lost_s = median([r["work_lost_s"] for r in results])
            per_epoch = results[0]["batches_per_epoch"]
            epoch_met = all(r["batches_lost"] <= r["batches_per_epoch"] for r in results)
            summary.setdefault("medians", {}).setdefault(name, {})[how] = {
                "recovery_s": recovery,
                "detected_s": median(detected) if detected else None,
                "claim_to_first_batch_s": median(start) if start else None,
                "batches_lost": lost,
                "work_lost_s": lost_s,
                "at_most_one_epoch_lost": epoch_met,
            }
            rows.append(
                [
                    f"{name}: {how}",
                    fmt(recovery, 1),
                    fmt(median(detected), 1) if detected else "n/a",
                    fmt(median(start), 1) if start else "n/a",
                    f"{fmt(lost, 1)} of {per_epoch}",
                    fmt(lost_s, 1),
                    target(epoch_met),
                ]
            )
    table = markdown_table(
        [
            "strike",
            "recovery s",
            "attempt over s",
            "claim to first batch s",
            "batches lost",
            "work lost s",
            "<= one epoch lost",
        ],
        rows,
    )
    finish(f"Recovery (lease {lease:g} s, sweep every {SWEEP_INTERVAL_S:g} s)", opts, table, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
