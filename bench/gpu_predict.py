"""Issue 13's one-shot GPU check (driven by bench/gpu_check.sh): prediction latency and training throughput.

    python -m bench.gpu_predict predict --device cuda --sizes 320 640 -n 50 --json OUT.json
    python -m bench.gpu_predict train --device cuda --input-size 640 --images 800 --json OUT.json

predict: YOLO-NAS-S built from scratch (no downloads, 3 classes) with the processing params a job's
checkpoint carries at that input size, saved as a checkpoint and loaded back with the project's
`app.ml.inference.load_model`; one 1280x960 image; per input size: the project's held fused pipeline
(`build_pipeline`: fp16 on CUDA), SG's `model.predict(fuse_model=False)` (the seed's call), the held
pipeline on the CPU, and the ONNX file of `app.ml.export.export_onnx` (SG's `model.export`, pre- and
post-processing and NMS inside) in onnxruntime with each available provider (letterbox in OpenCV plus
`session.run`, and `session.run` alone). Untrained weights: detections are counted, not judged.

train: plain super-gradients (`bench.plain_sg`, the seed's `Trainer.train`) against the service's own
training process (`python -m worker.train_process JOB 1`: DB reporter, callbacks, SG logger, atomic
checkpoints) on a job inserted into a throw-away SQLite database as POST /jobs creates it, with no API
or Celery; same generated dataset, model, input size and parameters; rounds interleaved (plain,
service, plain, service). Throughput is `bench.harness.throughput` (images/s from the end of the
first batch of epoch 2 to the end of the last batch).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import harness

REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "triangle")
BATCH_LOSS = "Batch_PPYoloELoss/loss"


def say(message: str) -> None:
    """Progress on the real stderr (super-gradients replaces sys.stdout and sys.stderr)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    stream.flush()


def stats(samples: list[float]) -> dict[str, float]:
    """Median, p95, mean and min in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": p95 * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "min_ms": ordered[0] * 1000,
        "n": len(ordered),
    }


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix="sgjobs-gpu-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write `data` to `path` (if any) and print it on the real stdout."""
    text = json.dumps(data, indent=1, default=str)
    if path is not None:
        path.write_text(text)
    stream = sys.__stdout__ or sys.stdout
    stream.write(text + "\n")
    stream.flush()


# --------------------------------------------------------------------------------------------------
# predict


def _image(width: int, height: int) -> Any:
    return harness.synthetic_image(width, height, shapes=6, smallest=8, largest=3)


def _checkpoint(work: Path, size: int) -> Path:
    """A YOLO-NAS-S checkpoint (random weights) carrying what a job's checkpoint carries at `size`:
    the validation set's processing params, from the project's own dataset code."""
    import torch
    from super_gradients.training import models

    from app.datasets.demo import ShapesSpec, write_shapes_dataset
    from app.ml.params import TrainingConfig
    from app.ml.training import _dataset
    from app.ml.types import SplitFiles

    root = work / "proc-dataset"
    if not root.exists():
        write_shapes_dataset(root, ShapesSpec(splits=(("valid", 2),), roboflow_placeholder=False))
    split = SplitFiles(root / "valid", root / "valid" / "_annotations.coco.json", 2)
    config = TrainingConfig(
        model="yolo_nas_s", job_dir=work, class_names=CLASSES, train=split, val=split, input_size=(size, size)
    )
    params = _dataset(split, config, train=False).get_dataset_preprocessing_params()
    params["class_names"] = [str(name) for name in params["class_names"]]
    model = models.get("yolo_nas_s", num_classes=len(CLASSES), pretrained_weights=None)
    path = work / f"ckpt_{size}.pth"
    torch.save({"net": model.state_dict(), "processing_params": params}, path)
    return path


def _letterbox(image: Any, size: int) -> Any:
    """SG's DetectionLongestMaxSizeRescale + bottom-right padding (114), as uint8 [1, 3, S, S]."""
    import cv2
    import numpy as np

    height, width = image.shape[:2]
    scale = size / max(height, width)
    resized = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
    padded = np.full((size, size, 3), 114, dtype=np.uint8)
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])


def _measure_size(
    size: int, image: Any, work: Path, device: str, args: argparse.Namespace, errors: dict[str, str]
) -> dict[str, Any]:
    """Every way to predict `image` at input size `size`; a failing way is recorded in `errors`."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from app.ml.export import export_onnx
    from app.ml.inference import build_pipeline, load_model, run_pipeline, set_thresholds
    from app.ml.types import DEFAULT_CONF, DEFAULT_IOU

    out: dict[str, Any] = {}
    n, warmup = args.n, args.warmup

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        say(f"{size} px: {name}")
        try:
            return fn()
        except Exception as exc:  # one failure must not hide the other measurements
            errors[f"{size}/{name}"] = f"{type(exc).__name__}: {exc}"
            say(f"{size} px: {name} FAILED: {type(exc).__name__}: {exc}")
            return None

    def held(model: Any, key: str, runs: int) -> None:
        pipeline = build_pipeline(model)  # fp16 on CUDA
        set_thresholds(pipeline, conf=DEFAULT_CONF, iou=DEFAULT_IOU)
        samples = harness.timed(lambda: run_pipeline(pipeline, [image]), runs, warmup)
        pred = run_pipeline(pipeline, [image])[0]
        out[key] = stats(samples) | {"detections": len(pred.prediction.bboxes_xyxy)}

    def seed_call(model: Any) -> None:
        samples = harness.timed(
            lambda: model.predict(image, conf=DEFAULT_CONF, iou=DEFAULT_IOU, fuse_model=False),
            max(3, n // 3),
            2,
        )
        out[f"model_predict_fuse_false_{device}"] = stats(samples)

    def export(ckpt: Path, onnx_file: Path) -> Any:
        exported = export_onnx("yolo_nas_s", ckpt, onnx_file, conf=DEFAULT_CONF, iou=DEFAULT_IOU)
        out["export"] = {
            "seconds": exported.seconds,
            "mb": exported.size / 1e6,
            "input_shape": exported.input_shape,
            "input_dtype": exported.input_dtype,
            "outputs": exported.outputs,
        }
        return exported

    def run_ort(onnx_file: Path, provider: str) -> None:
        session = ort.InferenceSession(str(onnx_file), providers=[provider])
        name = session.get_inputs()[0].name
        prepared = _letterbox(image, size)
        run_only = harness.timed(lambda: session.run(None, {name: prepared}), n, warmup)
        total = harness.timed(lambda: session.run(None, {name: _letterbox(image, size)}), n, warmup)
        outputs = session.run(None, {name: prepared})
        key = provider.removesuffix("ExecutionProvider").lower()
        out[f"ort_{key}_letterbox_and_run"] = stats(total) | {
            "detections": int(np.asarray(outputs[0]).reshape(-1)[0])
        }
        out[f"ort_{key}_run_only"] = stats(run_only)
        out[f"ort_{key}_session_providers"] = session.get_providers()

    ckpt = attempt("checkpoint", lambda: _checkpoint(work, size))
    if ckpt is None:
        return out
    model = attempt("load_model", lambda: load_model("yolo_nas_s", ckpt, device)[0])
    if model is not None:
        suffix = "_fp16" if device == "cuda" else ""
        attempt("held fused pipeline", lambda: held(model, f"held_fused_pipeline_{device}{suffix}", n))
        attempt("model.predict(fuse_model=False)", lambda: seed_call(model))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if device != "cpu":
        cpu_model = attempt("load_model on the CPU", lambda: load_model("yolo_nas_s", ckpt, "cpu")[0])
        if cpu_model is not None:
            attempt(
                "held fused pipeline on the CPU",
                lambda: held(cpu_model, "held_fused_pipeline_cpu_fp32", max(3, n // 3)),
            )
    onnx_file = work / f"model_{size}.onnx"
    if attempt("export_onnx", lambda: export(ckpt, onnx_file)) is None:
        return out
    for provider in ort.get_available_providers():
        if provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            attempt(f"onnxruntime {provider}", functools.partial(run_ort, onnx_file, provider))
    return out


def predict_main(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every way to predict, per input size."""
    from app.ml.sg_setup import prepare_this_process

    result: dict[str, Any] = {"sizes": {}, "errors": {}}
    with workdir(args.keep) as work:
        prepare_this_process(work / "sglogs")
        import onnxruntime as ort
        import torch

        from app.ml.sg_setup import setup_device
        from app.ml.types import DEFAULT_CONF, DEFAULT_IOU

        device = setup_device(args.device)
        providers = ort.get_available_providers()
        result.update(
            device=device,
            gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
            torch=torch.__version__,
            onnxruntime=ort.__version__,
            ort_providers=providers,
            ort_device=ort.get_device(),
            cpus=os.cpu_count(),
            conf=DEFAULT_CONF,
            iou=DEFAULT_IOU,
            image="1280x960 RGB",
        )
        say(f"device {device}; onnxruntime providers {providers}")
        image = _image(1280, 960)
        for size in args.sizes:
            result["sizes"][str(size)] = _measure_size(size, image, work, device, args, result["errors"])
    return result


# --------------------------------------------------------------------------------------------------
# train


def _service_run(settings: Any, dataset: Any, size: Any, name: str, timeout: float) -> dict[str, Any]:
    """One job through `worker.train_process` (as the worker starts it, without the worker)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.jobs import files
    from app.jobs.models import Job, Metric
    from app.ml.sg_setup import training_environment
    from app.process import die_with_parent
    from bench.harness import job_spec, throughput
    from tests.support import insert_job

    job_id = insert_job(settings, dataset.relative, spec=job_spec(dataset, size, name), status="running")
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    extra = {"SGJOBS_DEVICE": size.device, "SGJOBS_DATALOADER_WORKERS": str(settings.dataloader_workers)}
    env = training_environment(settings, files.sg_log_dir(job_dir), extra=extra)
    log_file = job_dir / "bench-console.log"
    started = time.monotonic()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.train_process", job_id, "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=job_dir,
            preexec_fn=die_with_parent(),  # as the worker starts it: never outlives this process
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    wall = time.monotonic() - started
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        status, error, per_epoch = str(job.status), job.error_message, job.batches_per_epoch
        ran_on = job.device
        rows = session.execute(
            select(Metric.epoch, Metric.step, Metric.time).where(
                Metric.job_id == job_id, Metric.name == BATCH_LOSS
            )
        ).all()
    if code != 0 or not status.endswith("succeeded") or not per_epoch:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"service job {job_id}: exit {code}, status {status}, error {error}:\n{tail}")
    ends = [(e, s - e * per_epoch, t.timestamp()) for e, s, t in rows if e is not None and s is not None]
    tp = throughput(ends, dataset.train_images, size.batch_size)
    shutil.rmtree(job_dir, ignore_errors=True)  # checkpoints: hundreds of MB
    return {
        "images_per_second": tp.images_per_second,
        "window_s": tp.seconds,
        "window_images": tp.images,
        "median_batch_ms": tp.median_batch_s * 1000,
        "wall_s": wall,
        "job_id": job_id,
        "device": ran_on,
    }


def _plain_run(dataset: Any, size: Any, work: Path, label: str, timeout: float) -> dict[str, Any]:
    from bench.harness import run_plain, throughput

    plain = run_plain(dataset, size, work, label, timeout=timeout)
    tp = throughput(plain.batch_ends, plain.result["train_images"], size.batch_size)
    clock = plain.result["clock"]
    return {
        "images_per_second": tp.images_per_second,
        "window_s": tp.seconds,
        "window_images": tp.images,
        "median_batch_ms": tp.median_batch_s * 1000,
        "wall_s": plain.seconds,
        "import_s": clock["imported"][0] - clock["started"][0],
        "device": plain.result["device"],
    }


def train_main(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved plain / service rounds; stops early (keeping what it has) near `--deadline-s`."""
    from app.migrate import upgrade
    from app.settings import Settings
    from bench.harness import Size, make_dataset, median

    deadline = time.monotonic() + args.deadline_s
    size = Size(
        images=args.images,
        val_images=args.val_images,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        mixed_precision=True,
        repeats=args.repeats,
    )
    result: dict[str, Any] = {
        "size": size.__dict__,
        "dataloader_workers": 0,
        "runs": {"plain": [], "service": []},
        "errors": [],
    }
    with workdir(args.keep) as work:
        settings = Settings(home=work / "home", device=args.device, dataloader_workers=0)
        settings.ensure_dirs()
        upgrade(settings.database_url)
        start = time.monotonic()
        dataset = make_dataset(settings.datasets_dir, size)
        result["dataset_seconds"] = time.monotonic() - start
        seconds = result["dataset_seconds"]
        say(f"dataset: {size.images} train / {size.val_images} valid images in {seconds:.1f} s")
        longest = 0.0
        for round_ in range(size.repeats):
            for kind in ("plain", "service"):
                left = deadline - time.monotonic()
                if longest and left < longest * 1.15:
                    result["errors"].append(f"skipped {kind} round {round_ + 1}: {left:.0f} s left")
                    say(result["errors"][-1])
                    continue
                say(f"round {round_ + 1}/{size.repeats}: {kind}")
                began = time.monotonic()
                try:
                    if kind == "plain":
                        run = _plain_run(dataset, size, work, f"r{round_}", timeout=max(30.0, left))
                    else:
                        run = _service_run(settings, dataset, size, f"gpu-{round_}", timeout=max(30.0, left))
                except Exception as exc:
                    result["errors"].append(f"{kind} round {round_ + 1}: {type(exc).__name__}: {exc}")
                    say(f"{kind} FAILED: {result['errors'][-1][-3000:]}")
                    continue
                finally:
                    longest = max(longest, time.monotonic() - began)
                result["runs"][kind].append(run)
                say(
                    f"{kind}: {run['images_per_second']:.1f} images/s over {run['window_s']:.1f} s "
                    f"({run['window_images']} images), median batch {run['median_batch_ms']:.1f} ms, "
                    f"wall {run['wall_s']:.1f} s"
                )
    plain = [r["images_per_second"] for r in result["runs"]["plain"]]
    service = [r["images_per_second"] for r in result["runs"]["service"]]
    result["median_images_per_second"] = {"plain": median(plain), "service": median(service)}
    if plain and service:
        result["ratio_of_medians"] = median(service) / median(plain)
        result["paired_ratios"] = [s / p for s, p in zip(service, plain, strict=False)]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    p.add_argument("-n", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--input-size", type=int, default=640)
    t.add_argument("--images", type=int, default=800)
    t.add_argument("--val-images", type=int, default=32)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--deadline-s", type=float, default=280, help="start no run that would end after this")
    t.add_argument("--json", type=Path)
    t.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    result = predict_main(args) if args.command == "predict" else train_main(args)
    result["python"] = platform.python_version()
    result["seconds"] = time.monotonic() - started
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
