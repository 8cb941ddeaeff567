"""Issue 13's warm start on a device: jobs one after the other run in children of the fork server.

    python -m bench.gpu_fork --device cuda [--jobs 2] [--json FILE]

A real `sgjobs serve` (SQLite, the shipped default of a fork server per worker) on `--device`
trains `--jobs` tiny jobs one after the other. What must hold, each a check in the output:

- every job succeeds, and its warm-start event says the training process was forked by the fork
  server (not a spare that set itself up) and set up `--device` (a forked child that cannot use
  CUDA would say so and the fork server would stop forking: "not forking" in the worker's log);
- each training child exits by itself with 0 once its outcome is recorded, and is gone;
- on CUDA, per `nvidia-smi`: no finished child and not the fork server itself (which must never
  touch CUDA: a context does not survive a fork) holds GPU memory; the next child, waiting with its
  device set up, may.

Prints a markdown table and exits 1 when a check fails. On the CPU (`--device cpu`) every check but
the GPU memory one runs: `bench/gpu_check.sh --cpu-dry-run` uses that to exercise this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.testing import alive
from bench.harness import (
    BenchError,
    Service,
    Size,
    job_spec,
    make_dataset,
    markdown_table,
    services,
    wait_for_spare,
)
from worker.forkserver import NOT_FORKING
from worker.runner import LEASE_LOST_GRACE_SECONDS

SIZE = Size(images=16, val_images=4, input_size=64, epochs=1, batch_size=8, repeats=1)


def _warm_event(service: Service, job_id: str) -> dict[str, Any] | None:
    """The job's warm-start event (its data: pid, device, fork_server, ...)."""
    events = [e for e in service.events(job_id) if (e.get("data") or {}).get("standby")]
    return events[0] if events else None


def _exited(service: Service, job_id: str, pid: int, timeout: float) -> str | None:
    """The exit code the worker logged for the training process `pid` of attempt 1 (None: not yet)."""
    line = f"job {job_id}: training process {pid} of attempt 1 exited with "
    deadline = time.monotonic() + timeout
    while True:
        log = service.log_file.read_text(errors="replace")
        at = log.find(line)
        if at >= 0:
            return log[at + len(line) :].split("\n", 1)[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _gpu_pids() -> dict[int, int] | None:
    """PID -> MiB of GPU memory of every process with a CUDA context (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids: dict[int, int] = {}
    for row in out.strip().splitlines():
        pid, _, mib = row.partition(",")
        if pid.strip().isdigit():
            pids[int(pid)] = int(mib.strip()) if mib.strip().isdigit() else 0
    return pids


def run(device: str, jobs: int) -> tuple[list[list[str]], list[str], dict[str, Any]]:
    """Train `jobs` jobs one after the other; the table rows, the failed checks and the record."""
    size = replace(SIZE, device=device)
    failed: list[str] = []
    rows: list[list[str]] = []
    record: dict[str, Any] = {"device": device, "jobs": []}
    with tempfile.TemporaryDirectory(prefix="sgjobs-gpu-fork-") as tmp:
        work = Path(tmp)
        dataset = make_dataset(work / "datasets", size)
        with services(["sqlite"], work, work / "datasets", device) as svc:
            service = svc["sqlite"]
            for n in range(jobs):
                wait_for_spare(service)
                job = service.submit(job_spec(dataset, size, f"fork-{n + 1}"))
                done = service.wait(job["id"], timeout=900, interval=0.5)
                warm = _warm_event(service, job["id"])
                data = (warm or {}).get("data") or {}
                pid = data.get("pid")
                code = _exited(service, job["id"], pid, LEASE_LOST_GRACE_SECONDS / 2) if pid else None
                checks = {
                    "succeeded": done["status"] == "succeeded",
                    "forked by the fork server": bool(data.get("fork_server")),
                    f"device {device}": data.get("device") == device,
                    "child exited with 0": code == "0",
                    "child gone": pid is not None and not alive(pid),
                }
                failed += [f"job {n + 1}: {name}" for name, ok in checks.items() if not ok]
                record["jobs"].append(
                    {
                        "id": job["id"],
                        "status": done["status"],
                        "error": done.get("error"),
                        "warm": data,
                        "exit": code,
                        "checks": checks,
                    }
                )
                rows.append(
                    [
                        str(n + 1),
                        done["status"],
                        str(pid),
                        str(data.get("fork_server")),
                        str(data.get("device")),
                        str(data.get("waited_s")),
                        str(code),
                        "yes" if all(checks.values()) else "NO",
                    ]
                )
            log = service.log_file.read_text(errors="replace")
            if NOT_FORKING in log:
                failed.append(f"the worker's log says '{NOT_FORKING}'")
            gpu = _gpu_pids()
            record["gpu_processes_mib"] = gpu
            if device == "cuda":
                if gpu is None:
                    failed.append("no nvidia-smi to read the GPU's processes")
                else:
                    children = {j["warm"].get("pid") for j in record["jobs"]}
                    servers = {j["warm"].get("fork_server") for j in record["jobs"]}
                    failed += [f"finished child {p} holds {gpu[p]} MiB" for p in children if p in gpu]
                    failed += [f"the fork server {p} holds {gpu[p]} MiB" for p in servers if p in gpu]
    return rows, failed, record


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--jobs", type=int, default=2, help="jobs one after the other (default 2)")
    parser.add_argument("--json", type=Path, help="also write the record here")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    try:
        rows, failed, record = run(args.device, args.jobs)
    except BenchError as exc:
        print(f"gpu_fork: {exc}", file=sys.stderr)
        return 1
    record["failed"] = failed
    headers = ["job", "status", "child", "fork server", "device", "waited s", "exit", "checks"]
    print(f"## Warm start on {args.device}: jobs in children of the fork server\n")
    print(markdown_table(headers, rows))
    print(f"\nGPU processes after the jobs (pid: MiB): {record['gpu_processes_mib']}")
    print("\nAll checks passed." if not failed else "\nFAILED: " + "; ".join(failed))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
