"""CI smoke run: every benchmark in --smoke mode on SQLite; fails only if the harness itself breaks.

    python -m bench.smoke [--backend sqlite|postgres|both] [--out-dir DIR]

Missed targets are reported, never fatal: benchmarks are not tests. Exit status 1 when a benchmark
crashed, timed out or wrote no result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import REPO_ROOT

# Each: the module and its options beyond --smoke.
BENCHMARKS: tuple[tuple[str, ...], ...] = (
    ("bench.training_overhead",),
    ("bench.training_overhead", "--alternate", "1"),
    ("bench.cancel_latency",),
    ("bench.metric_freshness",),
    ("bench.job_start",),
    ("bench.control_plane",),
    ("bench.recovery",),
    ("bench.stream",),
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--out-dir", type=Path, help="keep each benchmark's JSON here")
    parser.add_argument("--timeout", type=float, default=600, help="per benchmark, seconds")
    args = parser.parse_args()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sgjobs-bench-smoke-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for module, *options in BENCHMARKS:
            out = out_dir / f"{'-'.join([module.split('.')[-1], *(o.strip('-') for o in options)])}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", module, *options, "--smoke", "--backend", args.backend]
            cmd += ["--out", str(out)]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            started = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT)
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()  # the benchmark cleans up on SIGTERM
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                code = -1
            seconds = time.monotonic() - started
            ok = code == 0 and out.is_file() and bool(json.loads(out.read_text()).get("results"))
            label = " ".join([module, *options])
            print(f"-> {label}: {'ok' if ok else f'BROKEN (exit {code})'} in {seconds:.0f} s\n", flush=True)
            if not ok:
                failures.append(label)
    if failures:
        print(f"harness broken in: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
