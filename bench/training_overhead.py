"""Benchmark 1, training overhead: images/s of plain super-gradients vs the same training as a job.

    python -m bench.training_overhead [--backend sqlite|postgres|both] [--repeats N] [--smoke] ...

Each round trains once with plain SG (bench.plain_sg: the seed's Trainer.train, default SG logger)
and once per backend as a job through the service (POST /jobs, broker, worker, training process,
DB logger, cancel callback), same dataset, model, input size and training parameters. Rounds are
interleaved (plain, sqlite, postgres, plain, ...) and medians reported.

Throughput (both): images per second from the end of the first batch of epoch 2 to the end of the
last batch of the last epoch (epoch 1 is warm-up; validation and checkpointing between epochs are
inside the window). Also shown: the median time from one batch end to the next inside an epoch
(per-batch cost without the epoch turns) and the wall time of the whole run (process start or POST
until the run/job ended: SG import, set-up, final average-model validation included).
Plain: perf_counter at each batch end, in the training process. Service: the `time` of the
per-batch `Batch_PPYoloELoss/loss` points, stamped at batch end in the training process.

`--alternate SECONDS`: plain SG and a job on each backend train at the same time, taking turns of
SECONDS on the CPU (the others stopped with SIGSTOP meanwhile: for a service its whole process
tree, API, worker, training process and inference process). Each side's images/s counts only the
seconds it ran. This VM's speed drifts by 20% within minutes, more than the 2% the target is about;
in turns of a few seconds every side sees the same drift, so each round's ratios are paired in
time. The service's writes to PostgreSQL, and the server's work for them, are in its turns (its
client waits for them); the database servers themselves are never stopped.
CPU only: a GPU would run the kernels queued before a stop on into the other side's turn.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import (
    TERMINAL,
    BenchError,
    Dataset,
    Options,
    Service,
    Size,
    Turns,
    build_parser,
    finish,
    finish_plain,
    fmt,
    freeze_tree,
    make_dataset,
    markdown_table,
    median,
    parse_options,
    remove_job_dir,
    run_plain,
    service_batch_ends,
    services,
    start_plain,
    target,
    thaw_tree,
    throughput,
    wait_for_spare,
    workspace,
)
from bench.harness import job_spec as make_job_spec

DEFAULTS = Size(images=256, val_images=32, input_size=64, epochs=3, batch_size=8, repeats=3)
SMOKE = Size(images=16, val_images=8, input_size=64, epochs=2, batch_size=8, repeats=1)
TARGET_RATIO = 0.98


@contextmanager
def _set_up(opts: Options) -> Iterator[tuple[Path, Dataset, dict[str, Service]]]:
    """The work folder, the dataset in it and a running service per backend, for either mode."""
    with workspace(opts, "overhead") as work:
        datasets_dir = work / "datasets"
        dataset = make_dataset(datasets_dir, opts.size)
        with services(opts.backends, work, datasets_dir, opts.size.device) as svc:
            yield work, dataset, svc


def main() -> int:
    parser = build_parser(__doc__ or "", DEFAULTS, SMOKE)
    parser.add_argument(
        "--alternate",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="train plain SG and the job at once, taking turns of SECONDS (default 0: one after the other)",
    )
    opts, args = parse_options(parser, DEFAULTS, SMOKE)
    size = opts.size
    if size.epochs < 2:
        parser.error("--epochs must be >= 2 (epoch 1 is warm-up)")
    if args.alternate < 0:
        parser.error("--alternate must be >= 0")
    if args.alternate and size.device != "cpu":
        # A GPU runs the kernels queued before a stop on into the other side's turn.
        parser.error("--alternate measures CPU training only (--device cpu)")
    if args.alternate:
        return alternating(opts, args.alternate)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], **{b: [] for b in opts.backends}}
    with _set_up(opts) as (work, dataset, svc):
        for round_ in range(size.repeats):
            # Each worker starts its spare training process (seconds of imports) when a training
            # ends: no round starts before every spare is waiting, so none measures that import.
            for service in svc.values():
                wait_for_spare(service)
            print(f"round {round_ + 1}/{size.repeats}: plain", file=sys.stderr, flush=True)
            plain = run_plain(dataset, size, work, f"r{round_}")
            tp = throughput(plain.batch_ends, plain.result["train_images"], size.batch_size)
            runs["plain"].append(
                {
                    "images_per_second": tp.images_per_second,
                    "window_s": tp.seconds,
                    "window_images": tp.images,
                    "median_batch_s": tp.median_batch_s,
                    "wall_s": plain.seconds,
                    "device": plain.result["device"],
                }
            )
            for name, service in svc.items():
                for other in svc.values():
                    wait_for_spare(other)
                print(f"round {round_ + 1}/{size.repeats}: {name}", file=sys.stderr, flush=True)
                posted = time.time()
                job = service.submit(make_job_spec(dataset, size, f"overhead-{name}-{round_}"))
                done = service.wait(job["id"], timeout=1800, interval=0.5)
                wall = time.time() - posted
                if done["status"] != "succeeded":
                    raise BenchError(f"{name} job {job['id']} {done['status']}: {done.get('error')}")
                ends = service_batch_ends(service, job["id"])
                tp = throughput(ends, dataset.train_images, size.batch_size)
                runs[name].append(
                    {
                        "images_per_second": tp.images_per_second,
                        "window_s": tp.seconds,
                        "window_images": tp.images,
                        "median_batch_s": tp.median_batch_s,
                        "wall_s": wall,
                        "device": done.get("device"),
                        "job_id": job["id"],
                    }
                )
                remove_job_dir(done)

    plain_median = median([r["images_per_second"] for r in runs["plain"]])
    rows = []
    summary: dict[str, Any] = {"runs": runs, "medians": {}, "ratios": {}}
    for name, results in runs.items():
        ips = [r["images_per_second"] for r in results]
        med = median(ips)
        summary["medians"][name] = med
        ratio: float | None = None
        paired: float | None = None
        if name != "plain":
            ratio = med / plain_median
            paired = median(
                [
                    s["images_per_second"] / p["images_per_second"]
                    for s, p in zip(results, runs["plain"], strict=False)
                ]
            )
            summary["ratios"][name] = {"of_medians": ratio, "median_of_paired": paired}
        rows.append(
            [
                "plain SG" if name == "plain" else f"service ({name})",
                ", ".join(fmt(x) for x in ips),
                fmt(med),
                fmt(median([r["median_batch_s"] * 1000 for r in results]), 1),
                fmt(median([r["wall_s"] for r in results]), 1),
                fmt(ratio, 3) if ratio is not None else "1",
                fmt(paired, 3) if paired is not None else "",
                target(ratio >= TARGET_RATIO) if ratio is not None else "",
            ]
        )
    table = markdown_table(
        [
            "run",
            "images/s per round",
            "median images/s",
            "median batch ms",
            "median wall s",
            "ratio to plain",
            "median paired ratio",
            f"ratio >= {TARGET_RATIO}",
        ],
        rows,
    )
    finish("Training overhead", opts, table, summary)
    return 0


def _run_in_turns(
    svc: dict[str, Service], dataset: Dataset, size: Size, work: Path, label: str, window: float
) -> dict[str, dict[str, Any]]:
    """One round of `--alternate`: plain SG and a job on each service, in turns; each side's
    throughput, and each backend's ratio to the plain run."""
    # The plain run starts (and takes the first turn) alone.
    stopped = {name: freeze_tree(service.pid) for name, service in svc.items()}
    try:
        plain_process = start_plain(dataset, size, work, label)
    finally:
        for name, service in svc.items():
            thaw_tree(service.pid, stopped[name])
    jobs = {
        name: s.submit(make_job_spec(dataset, size, f"overhead-{name}-{label}")) for name, s in svc.items()
    }
    finals: dict[str, dict[str, Any]] = {}

    def service_done(name: str) -> Callable[[], bool]:
        def done() -> bool:
            finals[name] = svc[name].job(jobs[name]["id"])
            return finals[name]["status"] in TERMINAL

        return done

    turns = Turns({"plain": plain_process.proc.pid, **{n: s.pid for n, s in svc.items()}}, window)
    turns.run({"plain": lambda: plain_process.proc.poll() is not None, **{n: service_done(n) for n in svc}})
    plain = finish_plain(plain_process)
    plain_tp = throughput(
        plain.wall_batch_ends, plain.result["train_images"], size.batch_size, turns.turns["plain"]
    )
    out: dict[str, dict[str, Any]] = {"plain": {**asdict(plain_tp), "turns": len(turns.turns["plain"])}}
    for name, service in svc.items():
        final = finals[name]
        if final["status"] != "succeeded":
            raise BenchError(f"{name} job {final['id']} {final['status']}: {final.get('error')}")
        ends = service_batch_ends(service, final["id"])
        tp = throughput(ends, dataset.train_images, size.batch_size, turns.turns[name])
        out[name] = {
            **asdict(tp),
            "ratio": tp.images_per_second / plain_tp.images_per_second,
            "turns": len(turns.turns[name]),
            "job_id": final["id"],
            "device": final.get("device"),
        }
        remove_job_dir(final)
    return out


def alternating(opts: Options, window: float) -> int:
    """`--alternate`: every round trains plain SG and a job on each backend, in turns of `window` s."""
    size = opts.size
    rounds: list[dict[str, dict[str, Any]]] = []
    with _set_up(opts) as (work, dataset, svc):
        for round_ in range(size.repeats):
            for service in svc.values():
                wait_for_spare(service)
            sides = ", ".join(["plain", *svc])
            print(f"round {round_ + 1}/{size.repeats}: {sides} in turns", file=sys.stderr, flush=True)
            result = _run_in_turns(svc, dataset, size, work, f"r{round_}", window)
            figures = ", ".join(f"{n} {r['images_per_second']:.2f}" for n, r in result.items())
            print(f"  images/s: {figures}", file=sys.stderr, flush=True)
            rounds.append(result)
    plain_ips = [r["plain"]["images_per_second"] for r in rounds]

    def split(name: str) -> list[str]:
        """Median over rounds of the mean batch (ms) and of the mean epoch turn (s)."""
        batch = [r[name]["batch_s"] / max(1, r[name]["batches"] - r[name]["epoch_turns"]) for r in rounds]
        turn = [r[name]["epoch_turns_s"] / max(1, r[name]["epoch_turns"]) for r in rounds]
        return [
            fmt(median([r[name]["median_batch_s"] * 1000 for r in rounds]), 1),
            fmt(median(batch) * 1000, 1),
            fmt(median(turn), 2),
        ]

    rows = [["plain SG", ", ".join(fmt(x) for x in plain_ips), "", "1", *split("plain"), ""]]
    summary: dict[str, Any] = {"window_s": window, "rounds": rounds, "ratios": {}}
    for name in opts.backends:
        ratios = [r[name]["ratio"] for r in rounds]
        med = median(ratios)
        summary["ratios"][name] = med
        rows.append(
            [
                f"service ({name})",
                ", ".join(fmt(r[name]["images_per_second"]) for r in rounds),
                ", ".join(fmt(x, 3) for x in ratios),
                fmt(med, 3),
                *split(name),
                target(med >= TARGET_RATIO),
            ]
        )
    table = markdown_table(
        [
            "run",
            "images/s per round",
            "ratio to plain per round",
            "median ratio",
            "median batch ms",
            "mean batch ms",
            "mean epoch turn s",
            f"median >= {TARGET_RATIO}",
        ],
        rows,
    )
    finish(f"Training overhead (in turns of {window:g} s)", opts, table, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
