"""Warm /predict latency against super-gradients' in-process predict and onnxruntime's own
in-process latency, and throughput with 4 clients.

    .venv/bin/python -m bench.predict_latency                 # starts `sgjobs serve`, trains a tiny model
    .venv/bin/python -m bench.predict_latency --url http://127.0.0.1:8000 --job <id>
    .venv/bin/python -m bench.predict_latency --in-process-only --input-size 640   # no service

`--in-process-only` measures the in-process ways alone, on a stand-in checkpoint: random YOLO-NAS-S
weights with the preprocessing a job trained through the API at `--input-size` px carries (the
latency does not depend on the weights, bar NMS on a handful of boxes).

Everything runs in one invocation on one machine: N sequential warm requests of one image over
HTTP, then the same image through `model.predict` in a process of its own (super-gradients'
import rewires stdout and logging) two ways: as the seed calls it (`fuse_model=False`) and the
best in-process way (one held fused pipeline); then onnxruntime in the same process on the serving
ONNX file (`app.ml.export.export_for_serving`): the session alone on the preprocessed image
(onnxruntime's own latency) and with `app.ml.ort`'s preprocessing and NMS (what the ORT backend of
/predict runs), and SG's own ONNX export with preprocessing and NMS inside. Then 4 concurrent HTTP
clients. Prints a markdown
section (and appends it to --markdown FILE if given).
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


def _http_latency(client: httpx.Client, job_id: str, payload: bytes, n: int) -> HttpRun:
    run = HttpRun()
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


def _in_process(
    checkpoint: str, image_file: Path, n: int, standin_size: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run this module with --in-process in a fresh interpreter and read its JSON answer."""
    env = {**os.environ, "CRASH_HANDLER": "FALSE", "CONSOLE_LOG_LEVEL": "ERROR"}
    env["SUPER_GRADIENTS_LOG_DIR"] = str(image_file.parent / "sg_logs")
    command = [sys.executable, "-m", "bench.predict_latency", "--in-process", checkpoint, str(image_file)]
    command += ["-n", str(n), "--device", device]
    if standin_size is not None:
        command += ["--standin", str(standin_size)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


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


def in_process_main(checkpoint: str, image_file: str, n: int, standin_size: int | None, device: str) -> None:
    """The in-process side on `device`: `model.predict` as the seed calls it, one held fused pipeline
    (fp16 on CUDA), then onnxruntime on the serving ONNX file and on SG's own export (with the
    providers the service would pick for `device`)."""
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
    result: dict[str, Any] = {"device": device}
    if device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(0)

    def timed(fn: Any) -> list[float]:
        return harness.timed(fn, n, warmup=3)

    result["predict_fuse_false"] = _stats(
        timed(lambda: model.predict(image, conf=DEFAULT_CONF, iou=DEFAULT_IOU, fuse_model=False))
    )
    pipeline = build_pipeline(model)
    set_thresholds(pipeline, conf=DEFAULT_CONF, iou=DEFAULT_IOU)
    result["held_fused_pipeline"] = _stats(timed(lambda: pipeline([image], batch_size=1)))

    work = Path(image_file).parent
    serving = export_for_serving("yolo_nas_s", Path(checkpoint), work / "serving.onnx")
    result["serving_export_seconds"] = serving.seconds
    result["serving_onnx_mb"] = serving.size / 1e6
    ort = OrtModel.load(Path(serving.path), device=device)
    result["ort_providers"] = ort.providers
    tensor = preprocess(image, ort.spec.steps)[0][None]
    result["ort_session_only"] = _stats(timed(lambda: ort.session.run(None, {ort.input_name: tensor})))
    result["ort_with_pre_post"] = _stats(
        timed(lambda: ort.predict([image], conf=DEFAULT_CONF, iou=DEFAULT_IOU))
    )

    sg_export = export_onnx("yolo_nas_s", Path(checkpoint), work / "sg_export.onnx")
    result["sg_export_seconds"] = sg_export.seconds
    import onnxruntime

    session = onnxruntime.InferenceSession(sg_export.path, providers=providers_for(device))
    height, width = sg_export.input_shape[2:]
    # SG's exported graph takes the image already at the input size (its own resize is not inside).
    resized = np.asarray(Image.fromarray(image).resize((width, height)), dtype=np.uint8).transpose(2, 0, 1)[
        None
    ]
    name = session.get_inputs()[0].name
    result["sg_onnx_with_nms"] = _stats(timed(lambda: session.run(None, {name: resized})))
    assert sys.__stdout__ is not None
    sys.__stdout__.write("RESULT " + json.dumps(result) + "\n")  # SG replaced sys.stdout


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


def _in_process_only(
    args: argparse.Namespace, width: int, height: int, image_file: Path, payload: bytes
) -> str:
    local = _in_process(
        str(image_file.parent / "standin.pth"), image_file, args.n, args.input_size, args.device
    )
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
        in_process_main(args.in_process[0], args.in_process[1], args.n, args.standin, args.device)
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
        _http_latency(client, job_id, payload, 5)
        print(f"{args.n} warm /predict requests...", file=sys.stderr)
        run = _http_latency(client, job_id, payload, args.n)
        http = _stats(run.seconds)
        served = ", ".join(f"{name} {count}" for name, count in run.backends.most_common())
        inference_ms = statistics.median(run.inference_ms)
        stats = client.get("/predict/stats").json()
        print(f"{args.clients} concurrent clients...", file=sys.stderr)
        limit = args.throughput_seconds
        throughput = _throughput(url, headers, job_id, payload, args.clients, args.per_client, limit)
        single = _throughput(url, headers, job_id, payload, 1, args.per_client, limit)
        print("in-process predict...", file=sys.stderr)
        local = _in_process(checkpoint, image_file, args.n, device=args.device)

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
        f"JPEG ({len(payload) / 1000:.0f} kB); conf 0.25, iou 0.65; n = {args.n} each, after warm-up; "
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
        f"vs the ORT backend in process: {http['median_ms'] / local['ort_with_pre_post']['median_ms']:.2f}x.",
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
