"""Warm /predict latency against super-gradients' in-process predict and onnxruntime's own
in-process latency, and throughput with 4 clients.

    .venv/bin/python -m bench.predict_latency                 # starts `sgjobs serve`, trains a tiny model
    .venv/bin/python -m bench.predict_latency --url http://127.0.0.1:8000 --job <id>
    .venv/bin/python -m bench.predict_latency --in-process-only --input-size 640   # no service

`--in-process-only` measures the in-process ways alone, on a stand-in checkpoint: random YOLO-NAS-S
weights with the preprocessing a job trained through the API at `--input-size` px carries (the
latency does not depend on the weights, bar NMS on a handful of boxes).

Everything runs in one invocation on one machine: N sequential warm requests of one image over
HTTP, and the same image through the in-process ways, held ready in a process of their own
(super-gradients' import rewires stdout and logging): `model.predict` as the seed calls it
(`fuse_model=False`), the best in-process way (one held fused pipeline), onnxruntime on the serving
ONNX file (`app.ml.export.export_for_serving`) alone on the preprocessed image (onnxruntime's own
latency) and with `app.ml.ort`'s preprocessing and NMS (what the ORT backend of /predict runs), and
SG's own ONNX export with preprocessing and NMS inside. The HTTP requests and the in-process calls
alternate in `--rounds` rounds: this VM's speed drifts by a fifth within minutes, so measured one
after the other, a ratio says as much about the drift as about the service. Each round's ratios are
reported besides the pooled medians. Then 4 concurrent HTTP clients. Prints a markdown section (and
appends it to --markdown FILE if given).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.testing import backend_resources, serve
from bench import harness

ROOT = Path(__file__).resolve().parents[1]


def _image(width: int, height: int) -> np.ndarray:
    image: np.ndarray = harness.synthetic_image(width, height, shapes=4, smallest=6, largest=2)
    return image


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


def _train(client: httpx.Client, home: Path, input_size: int) -> str:
    from app.datasets.demo import ShapesSpec, write_shapes_dataset

    write_shapes_dataset(home / "datasets" / "bench", ShapesSpec(splits=(("train", 32), ("valid", 8))))
    spec = {
        "name": "bench",
        "model": "yolo_nas_s",
        "dataset": {"format": "coco", "path": "bench"},
        "input_size": [input_size, input_size],
        "training": {"max_epochs": 2, "batch_size": 8, "lr_warmup_epochs": 0, "average_best_models": False},
    }
    job = client.post("/jobs", json=spec).json()
    print(f"training job {job['id']} ({input_size} px)...", file=sys.stderr)
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = client.get(f"/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"training failed: {job['error']}")
    return str(job["id"])


@dataclass
class HttpRun:
    """Sequential warm requests: client-side latency, and what the service said of each answer."""

    seconds: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)  # the inference process's own time
    backends: Counter[str] = field(default_factory=Counter)


def _http_latency(
    client: httpx.Client, job_id: str, payload: bytes, n: int, run: HttpRun | None = None
) -> HttpRun:
    """`n` sequential requests, added to `run` (a new one when None)."""
    run = run if run is not None else HttpRun()
    for _ in range(n):
        start = time.perf_counter()
        response = client.post("/predict", data={"job_id": job_id}, files=[("files", ("bench.jpg", payload))])
        run.seconds.append(time.perf_counter() - start)
        response.raise_for_status()
        answer = response.json()
        run.inference_ms.append(float(answer["inference_ms"]))
        run.backends[str(answer["backend"])] += 1
    return run


def _wait_for_onnxruntime(client: httpx.Client, job_id: str, payload: bytes, timeout: float) -> None:
    """Warm requests until onnxruntime answers (the worker exports a job's model for serving after its
    success, in the background), or `timeout` (the report says who answered the measured requests)."""
    deadline = time.monotonic() + timeout
    while "onnxruntime" not in _http_latency(client, job_id, payload, 1).backends:
        if time.monotonic() > deadline:
            return
        time.sleep(1)


@dataclass
class Throughput:
    """Concurrent clients' images per second, and how many of their requests were sent."""

    images_per_second: float
    done: int
    planned: int

    def describe(self, clients: int) -> str:
        stopped = "" if self.done == self.planned else f", stopped at the time limit after {self.done}"
        rate = f"{self.images_per_second:.1f} images/s"
        return f"{rate} with {clients} client(s) ({self.planned} requests{stopped})"


def _throughput(
    url: str,
    headers: dict[str, str],
    job_id: str,
    payload: bytes,
    clients: int,
    per_client: int,
    time_limit: float = 60.0,
) -> Throughput:
    """`clients` threads sending `per_client` requests each, one after another; a client sends no
    new request after `time_limit` seconds (a service that slows down under load still gives a
    figure, from the requests it answered)."""
    errors: list[str] = []
    done: list[int] = []
    deadline = time.monotonic() + time_limit

    def run() -> None:
        sent = 0
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    break
                response = client.post(
                    "/predict", data={"job_id": job_id}, files=[("files", ("b.jpg", payload))]
                )
                if response.status_code != 200:
                    errors.append(response.text)
                sent += 1
        done.append(sent)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return Throughput(sum(done) / elapsed, sum(done), clients * per_client)


# The in-process ways, in the order each round measures them.
WAYS = (
    "predict_fuse_false",
    "held_fused_pipeline",
    "ort_session_only",
    "ort_with_pre_post",
    "sg_onnx_with_nms",
)


class InProcess:
    """This module with --in-process in a fresh interpreter (super-gradients' import rewires stdout
    and logging), holding every in-process way ready: `times(way, k)` runs `k` calls of one and
    returns their seconds, so that the bench can interleave them with HTTP requests."""

    def __init__(
        self, checkpoint: str, image_file: Path, standin_size: int | None = None, device: str = "cpu"
    ) -> None:
        env = {**os.environ, "CRASH_HANDLER": "FALSE", "CONSOLE_LOG_LEVEL": "ERROR"}
        env["SUPER_GRADIENTS_LOG_DIR"] = str(image_file.parent / "sg_logs")
        command = [sys.executable, "-m", "bench.predict_latency", "--in-process", checkpoint, str(image_file)]
        command += ["--device", device]
        if standin_size is not None:
            command += ["--standin", str(standin_size)]
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        self.meta: dict[str, Any] = self._answer("READY ")

    def _answer(self, prefix: str) -> Any:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(prefix):
                return json.loads(line.removeprefix(prefix))
        self._errors.seek(0)
        raise RuntimeError(self._errors.read().decode(errors="replace")[-3000:])

    def times(self, way: str, k: int) -> list[float]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{way} {k}\n")
        self._proc.stdin.flush()
        seconds: list[float] = self._answer("TIMES ")
        return seconds

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._errors.close()


def write_standin(checkpoint: Path, input_size: int) -> None:
    """Random YOLO-NAS-S weights (3 classes) with the processing params a job trained through the API
    at `input_size` px carries (the validation set's: `DetectionPaddedRescale` + standardize)."""
    import torch
    from super_gradients.training import models

    size = [input_size, input_size]
    processings: list[Any] = [
        "ReverseImageChannels",
        {"DetectionLongestMaxSizeRescale": {"output_shape": size}},
        {"DetectionLongestMaxSizeRescale": {"output_shape": size}},
        {"DetectionBottomRightPadding": {"output_shape": size, "pad_value": 114}},
        {"ImagePermute": {"permutation": [2, 0, 1]}},
        {"StandardizeImage": {"max_value": 255.0}},
    ]
    net = models.get("yolo_nas_s", num_classes=3, pretrained_weights=None).state_dict()
    processing = {
        "class_names": ["circle", "square", "triangle"],
        "image_processor": {"ComposeProcessing": {"processings": processings}},
        "iou": 0.65,
        "conf": 0.5,
    }
    torch.save({"net": net, "processing_params": processing}, checkpoint)


def in_process_main(checkpoint: str, image_file: str, standin_size: int | None, device: str) -> None:
    """The in-process side on `device`: `model.predict` as the seed calls it, one held fused pipeline
    (fp16 on CUDA), then onnxruntime on the serving ONNX file and on SG's own export (with the
    providers the service would pick for `device`). Each is made and called 3 times; then "READY
    {meta}" is written, and every "WAY K" line read is answered with "TIMES [seconds of K calls]"."""
    from app.ml.export import export_for_serving, export_onnx
    from app.ml.inference import build_pipeline, load_model, set_thresholds
    from app.ml.ort import OrtModel, preprocess, providers_for
    from app.ml.sg_setup import setup_device
    from app.ml.types import DEFAULT_CONF, DEFAULT_IOU

    if standin_size is not None:
        write_standin(Path(checkpoint), standin_size)
    image = np.asarray(Image.open(image_file).convert("RGB"))
    device = setup_device(device)  # as the inference process does: torch (and CUDA's libraries) first
    model, _ = load_model("yolo_nas_s", Path(checkpoint), device=device)
    meta: dict[str, Any] = {"device": device}
    if device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name(0)
    ways: dict[str, Any] = {
        "predict_fuse_false": lambda: model.predict(
            image, conf=DEFAULT_CONF, iou=DEFAULT_IOU, fuse_model=False
        )
    }
    pipeline = build_pipeline(model)
    set_thresholds(pipeline, conf=DEFAULT_CONF, iou=DEFAULT_IOU)
    ways["held_fused_pipeline"] = lambda: pipeline([image], batch_size=1)

    work = Path(image_file).parent
    serving = export_for_serving("yolo_nas_s", Path(checkpoint), work / "serving.onnx")
    meta["serving_export_seconds"] = serving.seconds
    meta["serving_onnx_mb"] = serving.size / 1e6
    ort = OrtModel.load(Path(serving.path), device=device)
    meta["ort_providers"] = ort.providers
    tensor = preprocess(image, ort.spec.steps)[0][None]
    ways["ort_session_only"] = lambda: ort.session.run(None, {ort.input_name: tensor})
    ways["ort_with_pre_post"] = lambda: ort.predict([image], conf=DEFAULT_CONF, iou=DEFAULT_IOU)

    sg_export = export_onnx("yolo_nas_s", Path(checkpoint), work / "sg_export.onnx")
    meta["sg_export_seconds"] = sg_export.seconds
    import onnxruntime

    session = onnxruntime.InferenceSession(sg_export.path, providers=providers_for(device))
    height, width = sg_export.input_shape[2:]
    # SG's exported graph takes the image already at the input size (its own resize is not inside).
    resized = np.asarray(Image.fromarray(image).resize((width, height)), dtype=np.uint8).transpose(2, 0, 1)[
        None
    ]
    name = session.get_inputs()[0].name
    ways["sg_onnx_with_nms"] = lambda: session.run(None, {name: resized})
    assert set(ways) == set(WAYS)
    for call in ways.values():
        harness.timed(call, 0, warmup=3)
    out = sys.__stdout__  # SG replaced sys.stdout
    assert out is not None
    out.write("READY " + json.dumps(meta) + "\n")
    out.flush()
    for line in sys.stdin:
        way, k = line.split()
        out.write("TIMES " + json.dumps(harness.timed(ways[way], int(k), warmup=0)) + "\n")
        out.flush()


def _where(local: dict[str, Any]) -> str:
    """The device the in-process ways ran on, and onnxruntime's providers for the serving file."""
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in local["ort_providers"])
    gpu = f"{local['gpu']} (device cuda)" if local.get("gpu") else "no GPU"
    return f"{gpu}, onnxruntime providers {providers}"


def _ort_lines(local: dict[str, Any], reference: dict[str, float], label: str) -> list[str]:
    """Table rows for the onnxruntime measurements, with their ratio to `reference` (`label`)."""
    rows = [
        ("onnxruntime session alone, serving ONNX (onnxruntime's own latency)", local["ort_session_only"]),
        ("onnxruntime + `app.ml.ort` preprocessing and NMS (the ORT backend)", local["ort_with_pre_post"]),
        (
            "onnxruntime, SG's own export (preprocessing and NMS inside, image pre-resized)",
            local["sg_onnx_with_nms"],
        ),
    ]
    return [
        f"| in-process, {name} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
        f"{r['median_ms'] / reference['median_ms']:.2f} / {r['p95_ms'] / reference['p95_ms']:.2f} |"
        for name, r in rows
    ] + [
        "",
        f"Ratios to {label}. Serving export: {local['serving_export_seconds']:.1f} s, "
        f"{local['serving_onnx_mb']:.1f} MB; SG's export: {local['sg_export_seconds']:.1f} s.",
    ]


def _local(meta: dict[str, Any], samples: dict[str, list[float]]) -> dict[str, Any]:
    """What the in-process side said of itself, with each way's statistics under its name."""
    return {**meta, **{way: _stats(seconds) for way, seconds in samples.items()}}


@dataclass
class Rounds:
    """The interleaved measurement: every sample of each way, and each round's medians (seconds)."""

    http: HttpRun = field(default_factory=HttpRun)
    samples: dict[str, list[float]] = field(default_factory=lambda: {way: [] for way in WAYS})
    medians: list[dict[str, float]] = field(default_factory=list)

    def paired(self, numerator: str, denominator: str) -> list[float]:
        """Per round, the ratio of two ways' medians ("http" is the HTTP requests)."""
        return [r[numerator] / r[denominator] for r in self.medians]


def _interleaved(
    client: httpx.Client, job_id: str, payload: bytes, local: InProcess, rounds: int, per_round: int
) -> Rounds:
    """`rounds` rounds of `per_round` HTTP requests, then `per_round` calls of each in-process way:
    this VM's speed drifts by 20% within minutes, so each round's ratios compare like with like."""
    result = Rounds()
    for _ in range(rounds):
        start = len(result.http.seconds)
        _http_latency(client, job_id, payload, per_round, result.http)
        medians = {"http": statistics.median(result.http.seconds[start:])}
        for way in WAYS:
            seconds = local.times(way, per_round)
            result.samples[way] += seconds
            medians[way] = statistics.median(seconds)
        result.medians.append(medians)
    return result


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"


def _in_process_only(
    args: argparse.Namespace, width: int, height: int, image_file: Path, payload: bytes
) -> str:
    ways = InProcess(str(image_file.parent / "standin.pth"), image_file, args.input_size, args.device)
    try:
        local = _local(ways.meta, {way: ways.times(way, args.n) for way in WAYS})
    finally:
        ways.close()
    seed, held = local["predict_fuse_false"], local["held_fused_pipeline"]
    load = os.getloadavg()
    lines = [
        f"## In-process latency at {args.input_size} px",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPU cores, "
        f"{_where(local)}, {platform.python_version()}; load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} (other jobs shared the machine).",
        f"Command: `.venv/bin/python -m bench.predict_latency {' '.join(sys.argv[1:])}`.",
        f"Model: stand-in YOLO-NAS-S (random weights, the preprocessing of a job trained at "
        f"{args.input_size} px); one {width}x{height} JPEG ({len(payload) / 1000:.0f} kB); conf 0.25, "
        f"iou 0.65; n = {args.n} each, after 3 warm-up calls.",
        "",
        "| one image | median ms | p95 ms | ratio to SG's held fused pipeline (median / p95) |",
        "| --- | ---: | ---: | ---: |",
        f"| in-process `model.predict(fuse_model=False)` (the seed) | {seed['median_ms']:.1f} | "
        f"{seed['p95_ms']:.1f} | {seed['median_ms'] / held['median_ms']:.2f} / "
        f"{seed['p95_ms'] / held['p95_ms']:.2f} |",
        f"| in-process, SG's held fused pipeline | {held['median_ms']:.1f} | {held['p95_ms']:.1f} | "
        "1.00 / 1.00 |",
        *_ort_lines(local, held, "SG's held fused pipeline"),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_service_args(parser)
    parser.add_argument("-n", type=int, default=60, help="sequential requests / calls per measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="the HTTP requests and in-process calls interleave in this many rounds",
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=25)
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=60.0,
        help="each throughput phase sends no new request after this long (a figure from what was answered)",
    )
    parser.add_argument("--size", default="320x240", help="image WxH")
    parser.add_argument(
        "--input-size", type=int, default=64, help="input size (px) of the trained or stand-in model"
    )
    parser.add_argument(
        "--in-process-only", action="store_true", help="no service: the in-process ways on a stand-in model"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the service's SGJOBS_DEVICE and the in-process ways' device (cuda: fp16 held pipeline, "
        "onnxruntime's CUDA or TensorRT provider where installed)",
    )
    parser.add_argument("--markdown", type=Path, help="append the markdown section to this file")
    parser.add_argument("--in-process", nargs=2, metavar=("CHECKPOINT", "IMAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--standin", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        in_process_main(args.in_process[0], args.in_process[1], args.standin, args.device)
        return 0

    width, height = (int(v) for v in args.size.lower().split("x"))
    image = _image(width, height)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    payload = buffer.getvalue()
    work = Path(tempfile.mkdtemp(prefix="sgjobs-bench-"))
    image_file = work / "bench.jpg"
    image_file.write_bytes(payload)
    if args.in_process_only:
        harness.emit(_in_process_only(args, width, height, image_file, payload), args.markdown)
        shutil.rmtree(work, ignore_errors=True)
        return 0
    with ExitStack() as stack:
        url = args.url
        headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
        if url is None:
            # SQLite in a fresh home (absolute), the CPU, quiet logs; stopped with the whole tree.
            backend = stack.enter_context(backend_resources("sqlite", prefix="sgjobs-bench"))
            settings = {"device": args.device, "log_level": "warning"}
            running = stack.enter_context(serve(backend, work, cwd=ROOT, settings=settings))
            url, headers = running.base_url, running.headers
        client = httpx.Client(base_url=url, headers=headers, timeout=300)
        job_id = args.job or _train(client, work, args.input_size)
        job = client.get(f"/jobs/{job_id}").json()
        input_size = job["spec"]["input_size"]
        checkpoint = job["artifacts"]["ckpt_best"]
        print("warming up (until onnxruntime answers)...", file=sys.stderr)
        _wait_for_onnxruntime(client, job_id, payload, timeout=180)
        if args.url is None:
            # After a training the worker starts its next spare training process, which imports
            # super-gradients (seconds of both CPUs here): measured during that, /predict is 3x slower.
            harness.wait_for_spare(running)
        print("in-process ways (super-gradients, onnxruntime)...", file=sys.stderr)
        ways = InProcess(checkpoint, image_file, device=args.device)
        stack.callback(ways.close)
        _http_latency(client, job_id, payload, 5)
        per_round = max(1, args.n // args.rounds)
        print(f"{args.rounds} rounds of {per_round} requests and calls of each way...", file=sys.stderr)
        rounds = _interleaved(client, job_id, payload, ways, args.rounds, per_round)
        run = rounds.http
        http = _stats(run.seconds)
        local = _local(ways.meta, rounds.samples)
        served = ", ".join(f"{name} {count}" for name, count in run.backends.most_common())
        inference_ms = statistics.median(run.inference_ms)
        stats = client.get("/predict/stats").json()
        print(f"{args.clients} concurrent clients...", file=sys.stderr)
        limit = args.throughput_seconds
        throughput = _throughput(url, headers, job_id, payload, args.clients, args.per_client, limit)
        single = _throughput(url, headers, job_id, payload, 1, args.per_client, limit)

    seed, held = local["predict_fuse_false"], local["held_fused_pipeline"]
    load = os.getloadavg()
    lines = [
        "## Prediction latency",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
        f"{os.cpu_count()} CPU cores, {_where(local)}, "
        f"{platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        " (other jobs shared the machine).",
        f"Command: `.venv/bin/python -m bench.predict_latency {' '.join(sys.argv[1:])}`".rstrip() + ".",
        f"Model: YOLO-NAS-S trained through the API at {input_size[0]}x{input_size[1]} px; "
        f"one {width}x{height} "
        f"JPEG ({len(payload) / 1000:.0f} kB); conf 0.25, iou 0.65; n = {len(run.seconds)} each, after "
        f"warm-up, in {args.rounds} interleaved rounds of {per_round} (HTTP, then each in-process way); "
        f"model loads during the run: {stats['model_loads']}.",
        "",
        "| one image | median ms | p95 ms | ratio to in-process `predict` (median / p95) |",
        "| --- | ---: | ---: | ---: |",
        f"| `POST /predict` over HTTP (warm, JSON) | {http['median_ms']:.1f} | {http['p95_ms']:.1f} | "
        f"{http['median_ms'] / seed['median_ms']:.2f} / {http['p95_ms'] / seed['p95_ms']:.2f} |",
        f"| in-process `model.predict(fuse_model=False)` (the seed) | {seed['median_ms']:.1f} | "
        f"{seed['p95_ms']:.1f} | 1.00 / 1.00 |",
        f"| in-process, one held fused pipeline (best in-process) | {held['median_ms']:.1f} | "
        f"{held['p95_ms']:.1f} | "
        f"{held['median_ms'] / seed['median_ms']:.2f} / {held['p95_ms'] / seed['p95_ms']:.2f} |",
        *_ort_lines(local, seed, "in-process `predict`"),
        "",
        f"Who answered the measured HTTP requests: {served}. The inference process's own time "
        f"(`inference_ms`, preprocessing + model + NMS) median {inference_ms:.1f} ms: "
        f"{http['median_ms'] - inference_ms:.1f} ms of the HTTP median is the API (multipart, decode), "
        "the hop to the inference process, the batching window and the answer's JSON.",
        "",
        f"HTTP vs onnxruntime's own latency (session alone): "
        f"{http['median_ms'] / local['ort_session_only']['median_ms']:.2f}x median; "
        f"vs the ORT backend in process: {http['median_ms'] / local['ort_with_pre_post']['median_ms']:.2f}x. "
        f"Paired by round: HTTP / session alone {_spread(rounds.paired('http', 'ort_session_only'))}; "
        f"SG's `predict` / HTTP {_spread(rounds.paired('predict_fuse_false', 'http'))}.",
        "",
        f"HTTP vs the best in-process way: {http['median_ms'] / held['median_ms']:.2f}x median, "
        f"{http['p95_ms'] / held['p95_ms']:.2f}x p95.",
        "",
        f"Throughput: {throughput.describe(args.clients)}; {single.describe(1)}. "
        "Concurrent requests for the same model share forward passes (see bench.predict_throughput "
        "for 1 vs 8 clients).",
        "",
    ]
    harness.emit("\n".join(lines), args.markdown)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
