"""Shared machinery of the benchmarks: backends, a real `sgjobs serve`, datasets, plain SG runs, stats.

Everything runs on this machine and talks to 127.0.0.1 only. Each context manager cleans up what it
created (processes, the throwaway PostgreSQL database, the Redis queue keys, temporary folders) also
when the benchmark fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app import testing
from app.datasets.demo import DEFAULT_CLASSES, ShapesSpec, write_shapes_dataset
from app.testing import Backend, process_tree, signal_quietly
from worker.standby import READY_FILE, STANDBY_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("SGJOBS_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SGJOBS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BACKENDS: tuple[str, ...] = ("sqlite", "postgres")
TERMINAL: tuple[str, ...] = ("succeeded", "failed", "cancelled")
BATCH_LOSS = "Batch_PPYoloELoss/loss"
DATASET_NAME = "shapes"


# Set from --keep: job directories and plain runs' files stay for inspection.
KEEP_FILES = False


def remove_job_dir(job: dict[str, Any]) -> None:
    """Delete a finished job's directory (checkpoints are big) unless --keep was given."""
    if job.get("job_dir") and not KEEP_FILES:
        shutil.rmtree(Path(job["job_dir"]), ignore_errors=True)


class BenchError(RuntimeError):
    """The harness itself could not do what it was asked (not a missed target)."""


# --------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Size:
    """The workload: dataset, model, input size and training parameters (same for plain and service)."""

    images: int = 96
    val_images: int = 16
    input_size: int = 64
    epochs: int = 3
    batch_size: int = 8
    model: str = "yolo_nas_s"
    device: str = "cpu"
    mixed_precision: bool = False
    repeats: int = 3


@dataclass
class Options:
    """Parsed command line of one benchmark."""

    backends: list[str]
    size: Size
    smoke: bool
    out: Path | None
    workdir: Path | None
    keep: bool
    extra: dict[str, Any] = field(default_factory=dict)


def build_parser(description: str, defaults: Size, smoke: Size) -> argparse.ArgumentParser:
    """The options every benchmark takes; `defaults` and `smoke` fill the ones not given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--repeats", type=int, help=f"default {defaults.repeats} (smoke {smoke.repeats})")
    p.add_argument("--images", type=int, help=f"training images (default {defaults.images})")
    p.add_argument("--val-images", type=int, help=f"validation images (default {defaults.val_images})")
    p.add_argument("--input-size", type=int, help=f"square input side, px (default {defaults.input_size})")
    p.add_argument("--epochs", type=int, help=f"max_epochs (default {defaults.epochs})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--model", choices=("yolo_nas_s", "yolo_nas_m", "yolo_nas_l"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default cpu")
    p.add_argument("--mixed-precision", action="store_true", help="AMP (CUDA only, as in the service)")
    p.add_argument("--smoke", action="store_true", help="tiny and fast (CI): checks the harness works")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, help="keep temporary files under this folder")
    p.add_argument("--keep", action="store_true", help="do not delete the work folder afterwards")
    return p


def parse_options(parser: argparse.ArgumentParser, defaults: Size, smoke: Size) -> tuple[Options, Any]:
    """Parse argv into Options (size knobs resolved against the defaults or smoke defaults)."""
    args = parser.parse_args()
    install_sigterm_handler()
    global KEEP_FILES
    KEEP_FILES = bool(args.keep)
    base = smoke if args.smoke else defaults
    size = replace(
        base,
        images=args.images or base.images,
        val_images=args.val_images or base.val_images,
        input_size=args.input_size or base.input_size,
        epochs=args.epochs or base.epochs,
        batch_size=args.batch_size or base.batch_size,
        model=args.model or base.model,
        device=args.device or base.device,
        mixed_precision=args.mixed_precision or base.mixed_precision,
        repeats=args.repeats or base.repeats,
    )
    if size.input_size % 32:
        parser.error("--input-size must be a multiple of 32")
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    return Options(backends, size, args.smoke, args.out, args.workdir, args.keep), args


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit, so every `finally` (services, databases, Redis keys) runs."""
    signal.signal(signal.SIGTERM, _on_sigterm)


# --------------------------------------------------------------------------------------------------
# Backends and the service


@contextmanager
def backend_resources(name: str) -> Iterator[Backend]:
    """SQLite: embedded defaults in SGJOBS_HOME. PostgreSQL + Redis: a throwaway database and queue."""
    if name not in BACKENDS:
        raise BenchError(f"unknown backend {name!r}")
    with testing.backend_resources(
        name, prefix="sgjobs-bench", pg_admin_url=PG_ADMIN_URL, redis_url=REDIS_URL
    ) as backend:
        yield backend


def service_env(backend: Backend, home: Path, datasets_dir: Path, device: str) -> dict[str, str]:
    """The service's environment: only location, backend and device; every tuning setting at default."""
    return testing.service_env(backend, home, datasets_dir=datasets_dir, device=device)


def parse_time(value: str) -> float:
    """An API timestamp (ISO 8601, UTC) as POSIX seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class Service:
    """A running `sgjobs serve` (API + one Celery worker) and a client for it."""

    backend: Backend
    base_url: str
    home: Path
    datasets_dir: Path
    log_file: Path
    # The `sgjobs serve` process: the root of the service's process tree (API, worker, training).
    pid: int
    client: httpx.Client = field(repr=False)
    # What a request needs to act as the service's admin (the client sends it already).
    headers: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name

    def settings(self) -> Any:
        """The service's settings, for direct (read-only or benchmark-data) access to its database."""
        from app.settings import Settings

        return Settings(
            home=self.home,
            datasets_dir=self.datasets_dir,
            database_url=self.backend.database_url,
            broker_url=self.backend.broker_url,
            task_queue=self.backend.queue,
        )

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/jobs", json=spec)
        if r.status_code != 201:
            raise BenchError(f"POST /jobs answered {r.status_code}: {r.text[:500]}")
        data: dict[str, Any] = r.json()
        return data

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/jobs/{job_id}")
        if r.status_code != 200:
            raise BenchError(f"GET /jobs/{job_id} answered {r.status_code}: {r.text[:500]}")
        data: dict[str, Any] = r.json()
        return data

    def cancel(self, job_id: str) -> httpx.Response:
        return self.client.post(f"/jobs/{job_id}/cancel")

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 600,
        interval: float = 0.05,
    ) -> dict[str, Any]:
        """Poll GET /jobs/{id} until `until(job)` (default: a terminal status); BenchError on timeout."""
        done = until or (lambda j: j["status"] in TERMINAL)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if until is not None and job["status"] in TERMINAL:
                raise BenchError(f"job {job_id} ended ({job['status']}) early: {job.get('error')}")
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(interval)

    def metrics(
        self, job_id: str, names: Sequence[str] = (), cursor: str | None = None
    ) -> list[dict[str, Any]]:
        """Every metric point (optionally only `names`), following next_cursor."""
        items: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"limit": 10000}
            if names:
                params["name"] = list(names)
            if cursor:
                params["cursor"] = cursor
            r = self.client.get(f"/jobs/{job_id}/metrics", params=params)
            if r.status_code != 200:
                raise BenchError(f"GET metrics answered {r.status_code}: {r.text[:500]}")
            page = r.json()
            items.extend(page["items"])
            if not page["items"]:
                return items
            cursor = page["next_cursor"]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = self.client.get(f"/jobs/{job_id}/events", params={"limit": 5000})
        if r.status_code != 200:
            raise BenchError(f"GET events answered {r.status_code}: {r.text[:500]}")
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def stop_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Cancel a job if it is still going and wait until it is finished."""
        job = self.job(job_id)
        if job["status"] not in TERMINAL:
            self.cancel(job_id)
            job = self.wait(job_id, timeout=timeout, interval=0.2)
        return job


@contextmanager
def running_service(
    backend: Backend,
    workdir: Path,
    datasets_dir: Path,
    device: str,
    settings: Mapping[str, object] | None = None,
) -> Iterator[Service]:
    """`sgjobs serve` (migrations, API on a free port, one worker) in a child process; stopped on exit.

    `settings`: more service settings (by `Settings` field name); the rest stay at their defaults."""
    home = workdir / f"home-{backend.name}-{backend.queue[-6:]}"
    settings = {**(settings or {}), "datasets_dir": datasets_dir, "device": device}
    try:
        with (
            testing.serve(backend, home, cwd=REPO_ROOT, settings=settings) as running,
            httpx.Client(base_url=running.base_url, headers=running.headers, timeout=30) as client,
        ):
            yield Service(
                backend,
                running.base_url,
                running.home,
                datasets_dir,
                running.log_file,
                running.pid,
                client,
                running.headers,
            )
    except testing.ServiceError as exc:  # only raised while it starts
        raise BenchError(str(exc)) from exc


@contextmanager
def workspace(opts: Options, label: str) -> Iterator[Path]:
    """A temporary folder for homes, datasets and plain runs (kept with --keep)."""
    base = opts.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"sgjobs-bench-{label}-", dir=base))
    try:
        yield path
    finally:
        if opts.keep:
            print(f"work folder kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def services(
    names: Sequence[str],
    workdir: Path,
    datasets_dir: Path,
    device: str,
    settings: Mapping[str, object] | None = None,
) -> Iterator[dict[str, Service]]:
    """One running service per backend name, all stopped (and their databases dropped) on exit."""
    with ExitStack() as stack:
        out: dict[str, Service] = {}
        for name in names:
            backend = stack.enter_context(backend_resources(name))
            out[name] = stack.enter_context(running_service(backend, workdir, datasets_dir, device, settings))
        yield out


# --------------------------------------------------------------------------------------------------
# Datasets and job specs


@dataclass(frozen=True)
class Dataset:
    """A generated shapes dataset in the datasets directory (Roboflow layout, no placeholder class)."""

    root: Path
    relative: str
    classes: tuple[str, ...]
    train_images: int
    val_images: int


def make_dataset(datasets_dir: Path, size: Size, name: str = DATASET_NAME) -> Dataset:
    """Generate the benchmark dataset; image sides scale with the input size (about 0.5x to 1x)."""
    # No Roboflow placeholder category: the plain script reads the very same files with SG's own
    # COCOFormatDetectionDataset and gets the same classes (ids 0..n-1) as the service.
    spec = ShapesSpec(
        splits=(("train", size.images), ("valid", size.val_images)),
        min_size=max(96, size.input_size // 2),
        max_size=max(160, size.input_size),
        roboflow_placeholder=False,
        seed=0,
    )
    root = write_shapes_dataset(datasets_dir / name, spec)
    return Dataset(root, name, DEFAULT_CLASSES, size.images, size.val_images)


def training_spec(size: Size, **overrides: Any) -> dict[str, Any]:
    """The job spec's `training` object: the seed's defaults except epochs, batch size and AMP."""
    training: dict[str, Any] = {
        "max_epochs": size.epochs,
        "batch_size": size.batch_size,
        "lr_warmup_epochs": 1 if size.epochs > 1 else 0,
        "mixed_precision": size.mixed_precision,
    }
    training.update(overrides)
    return training


def job_spec(dataset: Dataset, size: Size, name: str, **training: Any) -> dict[str, Any]:
    """A job spec for the benchmark dataset."""
    return {
        "name": name,
        "model": size.model,
        "dataset": {"format": "coco", "path": dataset.relative},
        "input_size": [size.input_size, size.input_size],
        "training": training_spec(size, **training),
    }


def batches_per_epoch(images: int, batch_size: int) -> tuple[int, list[int]]:
    """Batches per epoch and their sizes, with the service's rule (a one-image tail batch is dropped)."""
    bs = min(batch_size, images)
    drop_last = images > bs and images % bs == 1
    full, rest = divmod(images, bs)
    sizes = [bs] * full + ([] if drop_last or rest == 0 else [rest])
    return len(sizes), sizes


# --------------------------------------------------------------------------------------------------
# Plain super-gradients


@dataclass
class PlainRun:
    """What bench.plain_sg reported, plus its wall time."""

    result: dict[str, Any]
    seconds: float
    log_file: Path

    @property
    def batch_ends(self) -> list[tuple[int, int, float]]:
        """(epoch, batch index, perf_counter seconds) per training batch."""
        return [(int(e), int(b), float(t)) for e, b, t, _ in self.result["batches"]]

    @property
    def wall_batch_ends(self) -> list[tuple[int, int, float]]:
        """(epoch, batch index, POSIX time) per training batch: the clock the service's points use."""
        return [(int(e), int(b), float(w)) for e, b, _, w in self.result["batches"]]


@dataclass
class PlainProcess:
    """A started bench.plain_sg run (see `start_plain`)."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    result_file: Path
    log_file: Path
    started: float


def start_plain(
    dataset: Dataset,
    size: Size,
    workdir: Path,
    label: str,
    stop_after_batches: int | None = None,
    **training: Any,
) -> PlainProcess:
    """Start plain super-gradients training in a child process of its own process group
    (bench.plain_sg); `finish_plain` waits for it."""
    run_dir = workdir / f"plain-{label}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    config = {
        "data_dir": str(dataset.root),
        "train_images": str((dataset.root / "train").resolve()),
        "train_annotations": str((dataset.root / "train" / "_annotations.coco.json").resolve()),
        "val_images": str((dataset.root / "valid").resolve()),
        "val_annotations": str((dataset.root / "valid" / "_annotations.coco.json").resolve()),
        "class_names": list(dataset.classes),
        "model": size.model,
        "input_size": [size.input_size, size.input_size],
        "training": training_spec(size, **training),
        "device": size.device,
        "ckpt_root": str(run_dir / "checkpoints"),
        "stop_after_batches": stop_after_batches,
    }
    config_file = run_dir / "config.json"
    config_file.write_text(json.dumps(config))
    result_file = run_dir / "result.json"
    log_file = run_dir / "console.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    with open(log_file, "wb") as log:
        proc = testing.spawn_group(
            [sys.executable, "-m", "bench.plain_sg", str(config_file), str(result_file)],
            cwd=REPO_ROOT,
            log=log,
            env=env,
        )
    return PlainProcess(proc, run_dir, result_file, log_file, started)


def finish_plain(plain: PlainProcess, timeout: float = 1800) -> PlainRun:
    """Wait for a started plain run; its result, or BenchError (the run killed after `timeout`)."""
    try:
        code = plain.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if plain.proc.poll() is None:
            testing.kill_group(plain.proc)
    seconds = time.monotonic() - plain.started
    if code != 0 or not plain.result_file.is_file():
        tail = plain.log_file.read_text(errors="replace")[-3000:]
        raise BenchError(f"plain super-gradients run failed (exit {code}):\n{tail}")
    # Checkpoints and the averaging scratch file (hundreds of MB for big models) are not needed.
    if not KEEP_FILES:
        shutil.rmtree(plain.run_dir / "checkpoints", ignore_errors=True)
    return PlainRun(json.loads(plain.result_file.read_text()), seconds, plain.log_file)


def run_plain(
    dataset: Dataset,
    size: Size,
    workdir: Path,
    label: str,
    stop_after_batches: int | None = None,
    timeout: float = 1800,
    **training: Any,
) -> PlainRun:
    """Train with plain super-gradients in a child process (bench.plain_sg); raises BenchError on failure."""
    return finish_plain(start_plain(dataset, size, workdir, label, stop_after_batches, **training), timeout)


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class Throughput:
    """Images per second over the measured window (see `throughput`)."""

    images_per_second: float
    images: int
    seconds: float
    batches: int
    # Median time between consecutive batch ends inside one epoch (epoch turns excluded), window only.
    median_batch_s: float
    # The window's seconds, split: between batch ends of the same epoch (`batch_s`, the training
    # itself), and from an epoch's last batch end to the next epoch's first (`epoch_turns_s`, over
    # `epoch_turns` turns: validation, checkpoints, the averaging snapshot, then one batch).
    batch_s: float = 0.0
    epoch_turns_s: float = 0.0
    epoch_turns: int = 0


def throughput(
    ends: Sequence[tuple[int, int, float]],
    images: int,
    batch_size: int,
    turns: Sequence[tuple[float, float]] | None = None,
) -> Throughput:
    """Images/s from the end of the first batch of the second epoch to the end of the last batch.

    `ends` are (epoch, batch index, time in seconds) of every training batch, in any order; the images
    counted are those of the batches that ended inside the window (the first one's images are not),
    so validation, checkpointing and the epoch turns in between are part of the time, as for a user.

    `turns`: the (start, end) times, on the clock of `ends`, when the process was allowed to run
    (see `Turns`); the window's seconds are then only those it ran, and a gap between two batches
    counts in the median only when both ended in the same turn.
    """
    ordered = sorted(ends, key=lambda e: (e[0], e[1]))
    epochs = sorted({e for e, _, _ in ordered})
    if len(epochs) < 2:
        raise BenchError("throughput needs at least 2 epochs (the first is warm-up)")
    _, sizes = batches_per_epoch(images, batch_size)
    start_index = next(i for i, e in enumerate(ordered) if e[0] == epochs[1])
    window = ordered[start_index:]
    if len(window) < 2:
        raise BenchError("throughput window has fewer than 2 batches")
    counted = sum(sizes[b] if b < len(sizes) else sizes[-1] for _, b, _ in window[1:])
    pairs = list(zip(window, window[1:], strict=False))
    if turns is None:
        seconds = window[-1][2] - window[0][2]
        gaps = [b[2] - a[2] for a, b in pairs if a[0] == b[0]]
        spans = [(a[0] == b[0], b[2] - a[2]) for a, b in pairs]
    else:
        seconds = running_seconds(turns, window[0][2], window[-1][2])
        gaps = [b[2] - a[2] for a, b in pairs if a[0] == b[0] and _same_turn(turns, a[2], b[2])]
        spans = [(a[0] == b[0], running_seconds(turns, a[2], b[2])) for a, b in pairs]
    return Throughput(
        counted / seconds,
        counted,
        seconds,
        len(window) - 1,
        median(gaps),
        batch_s=sum(s for within, s in spans if within),
        epoch_turns_s=sum(s for within, s in spans if not within),
        epoch_turns=sum(1 for within, _ in spans if not within),
    )


def running_seconds(turns: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """How long, of [start, end], falls inside the turns."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in turns)


def _same_turn(turns: Sequence[tuple[float, float]], first: float, second: float) -> bool:
    return any(s <= first and second <= e for s, e in turns)


# --------------------------------------------------------------------------------------------------
# Taking turns: two workloads measured side by side on the same minutes of a drifting VM


def freeze_tree(root: int) -> set[int]:
    """SIGSTOP `root` and every descendant; the pids stopped. Listed again until no new one shows up:
    a process can fork between a listing and its own stop."""
    stopped: set[int] = set()
    while pids := set(process_tree(root)) - stopped:
        for pid in pids:
            signal_quietly(pid, signal.SIGSTOP)
        stopped |= pids
    return stopped


def thaw_tree(root: int, also: Iterable[int] = ()) -> None:
    """SIGCONT `root`, every descendant and the pids `also`: processes stopped in the tree that have
    left it since (a replaced fork server, reparented to init, would otherwise stay stopped)."""
    for pid in set(process_tree(root)) | set(also):
        signal_quietly(pid, signal.SIGCONT)


@dataclass
class Turns:
    """Process trees that run one at a time, each for `window` seconds in turn, the others stopped
    (SIGSTOP), so that a slow minute of the machine falls on all of them alike. A side that is done
    stays stopped until every side is done. `turns[name]` are the (start, end) POSIX times each ran."""

    roots: dict[str, int]
    window: float
    turns: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def run(self, done: Mapping[str, Callable[[], bool]], timeout: float = 3600) -> None:
        """Take turns (in the order of `roots`; the first starts now, the rest are stopped first)
        until every `done[name]()` (asked at the end of the side's own turn) is true; every tree
        runs again afterwards, whatever happened."""
        names = list(self.roots)
        finished = dict.fromkeys(names, False)
        self.turns = {name: [] for name in names}
        # Each tree's pids its last freeze stopped: those to continue, in the tree still or not.
        stopped: dict[str, set[int]] = {names[0]: set()}
        for name in names[1:]:
            stopped[name] = freeze_tree(self.roots[name])
        deadline = time.monotonic() + timeout
        current = names[0]
        try:
            start = time.time()  # taken before the thaw: the turn starts when the tree may run
            thaw_tree(self.roots[current], stopped[current])
            while True:
                time.sleep(self.window)
                finished[current] = done[current]()
                stopped[current] = freeze_tree(self.roots[current])
                self.turns[current].append((start, time.time()))
                waiting = [n for n in names if not finished[n]]
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"still running after {timeout} s of turns: {', '.join(waiting)}")
                after = names[(names.index(current) + 1) % len(names) :] + names
                current = next(n for n in after if not finished[n])
                start = time.time()
                thaw_tree(self.roots[current], stopped[current])
        finally:
            for name, root in self.roots.items():
                thaw_tree(root, stopped[name])


def service_batch_ends(service: Service, job_id: str) -> list[tuple[int, int, float]]:
    """(epoch, batch index, POSIX time) per training batch, from the Batch_ loss points' step and time."""
    points = service.metrics(job_id, names=[BATCH_LOSS])
    job = service.job(job_id)
    per_epoch = job["progress"]["batches_per_epoch"]
    if not per_epoch:
        raise BenchError(f"job {job_id} reports no batches_per_epoch")
    return [
        (int(p["epoch"]), int(p["step"]) - int(p["epoch"]) * per_epoch, parse_time(p["time"])) for p in points
    ]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """A description of where the numbers came from."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # torch missing or broken: still report the rest
        info["torch"] = f"unavailable: {exc}"
    return info


def finish(name: str, opts: Options, table: str, data: dict[str, Any]) -> None:
    """Print the markdown table and write the JSON record if asked."""
    header = f"## {name}\n\n{describe(opts)}\n"
    print(header)
    print(table)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": name,
            "options": asdict(opts.size),
            "backends": opts.backends,
            "smoke": opts.smoke,
        }
        record.update({"machine": machine(), "results": data, "finished": time.time()})
        opts.out.write_text(json.dumps(record, indent=2, default=str))
        print(f"\nJSON written to {opts.out}")


def describe(opts: Options) -> str:
    s = opts.size
    info = machine()
    where = info.get("gpu") or f"{info['cpus']} CPUs"
    return (
        f"{s.model} {s.input_size}px, {s.images} train / {s.val_images} valid images, batch {s.batch_size}, "
        f"{s.epochs} epochs, device {s.device}{', AMP' if s.mixed_precision else ''}; {s.repeats} repeats; "
        f"{where}, torch {info.get('torch')}, load average at start {info['load_average_at_start'][0]:.2f}"
        + (" (smoke)" if opts.smoke else "")
    )


def target(ok: bool) -> str:
    return "yes" if ok else "**no**"


# The longest wait for the worker's fork server to have a child ready before a start.
SPARE_WAIT_S = 120.0


def wait_for_spare(service: Any, timeout: float = SPARE_WAIT_S) -> bool:
    """Wait until the service's worker has a fork server whose child waits for a job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((service.home / STANDBY_DIR).glob(f"*/{READY_FILE}")):
            return True
        time.sleep(0.1)
    return False


def synthetic_image(width: int, height: int, *, shapes: int, smallest: int, largest: int) -> Any:
    """A seeded HWC RGB uint8 image: `shapes` random ellipses on grey, each side between
    min(width, height) // `smallest` and // `largest`. numpy and PIL are imported here so the
    harness stays light for benches that draw no images."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(shapes):
        size = int(rng.integers(min(width, height) // smallest, min(width, height) // largest))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        draw.ellipse((x, y, x + size, y + size), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return np.asarray(image)


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The options of a bench that measures a trained job on a service: --url, --job, --key."""
    parser.add_argument("--url", help="use a running service instead of starting one")
    parser.add_argument("--job", help="a succeeded job id on that service (else one is trained)")
    parser.add_argument(
        "--key", default=os.environ.get("SGJOBS_API_KEY"), help="API key for --url (default: $SGJOBS_API_KEY)"
    )


def timed(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    """Wall seconds of `n` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def emit(text: str, markdown: str | os.PathLike[str] | None) -> None:
    """Print a bench's report and append it to the `markdown` file when one is given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write(text + "\n")
