#!/usr/bin/env bash
# Issue 13's one-shot GPU check on a lent machine (one H100 or H200; python3 = Python 3.12 with
# torch, onnxruntime, numpy ... but no super-gradients): installs the carried wheels (.whl/), or uses
# packages already unpacked into $GPU_CHECK_SITE, checks the imports, then measures:
#   fork:    jobs one after the other in children of the fork server on the device (bench/gpu_fork.py:
#            forked, device cuda, each child exits by itself and leaves nothing on the GPU);
#   http:    the whole service on the GPU (bench/predict_latency.py --device cuda): a job trained
#            through the API, warm POST /predict against the in-process ways (SG's predict, the held
#            fp16 pipeline, onnxruntime's own latency with the CUDA provider), 320 and 640 px;
#   predict: SG held fused pipeline (fp16, CUDA) vs SG's ONNX export in onnxruntime, 320 and 640 px
#            (bench/gpu_predict.py);
#   train:   plain SG Trainer.train vs the service's training process (SQLite), 640 px, AMP,
#            interleaved plain/service/plain/service (bench/gpu_predict.py).
# onnxruntime's CUDA provider needs onnxruntime-gpu built for the machine's CUDA (13 there:
# onnxruntime-gpu 1.31); the image's own onnxruntime is a CPU build. `python -m bench.gpu_carry`
# packs it with the project's packages in parts of one call each, and says how to unpack them into
# /tmp/site there (then GPU_CHECK_SITE=/tmp/site).
# Each step is guarded (a failure does not stop the next) and logged to $OUT/<step>.log; results in
# $OUT/fork.md, $OUT/predict.json, $OUT/train.json and $OUT/summary.md. Whole run: about 6-8 minutes.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   OUT=/tmp/out PYTHON=.venv/bin/python CUDA_VISIBLE_DEVICES= bash bench/gpu_check.sh --cpu-dry-run
#       (tiny sizes on the CPU: exercises every Python path; the wheels are not installed)
# GPU_CHECK_STEPS (default "fork http predict train") picks the measurements; GPU_CHECK_BUDGET_S (420)
# bounds the run; GPU_CHECK_SITE=/tmp/site: the packages are there already (no .whl/ to install).
set -euo pipefail
export PYTHONUNBUFFERED=1
# albumentations (imported by SG) asks PyPI for its latest version on import: no network there.
export NO_ALBUMENTATIONS_UPDATE=1 CRASH_HANDLER=FALSE CONSOLE_LOG_LEVEL=${CONSOLE_LOG_LEVEL:-WARNING}

DRY=${GPU_CHECK_DRY:-0}
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
OUT=${OUT:-/tmp/gpu-check-out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}   # seconds for everything; steps get what is left
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
REPO=$PWD
# Every temporary file of the run (datasets, checkpoints, SG logs, ONNX files) goes under one folder.
SCRATCH=$(mktemp -d /tmp/gpu-check.XXXXXX)
export TMPDIR=$SCRATCH MPLCONFIGDIR=$SCRATCH/mpl

if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    PREDICT_ARGS=(--sizes 64 96 -n 4 --warmup 1)
    HTTP_SIZES=(64)
    HTTP_ARGS=(-n 5 --clients 2 --per-client 3)
    TRAIN_ARGS=(--input-size 64 --images 16 --val-images 4 --epochs 2 --batch-size 8 --repeats 1)
else
    DEVICE=cuda
    PREDICT_ARGS=(--sizes 320 640 -n 50 --warmup 5)
    HTTP_SIZES=(320 640)
    HTTP_ARGS=(-n 60 --clients 8 --per-client 25 --throughput-seconds 25)
    TRAIN_ARGS=(--input-size 640 --images 800 --val-images 32 --epochs 3 --batch-size 16 --repeats 2)
fi

declare -A STATUS=()
ORDER=()
left() { echo $((BUDGET - SECONDS)); }
# step NAME LIMIT_S CMD...: run CMD with a time limit, tee its output to $OUT/NAME.log, record the result.
step() {
    local name=$1 limit=$2
    shift 2
    local rest
    ORDER+=("$name")
    rest=$(left)
    ((limit > rest - 10)) && limit=$((rest - 10))
    if ((limit < 20)); then
        echo "=== $name: skipped, ${rest} s of the budget left" | tee -a "$OUT/$name.log"
        STATUS[$name]="skipped (budget)"
        return 0
    fi
    echo "=== $name (limit ${limit} s, t=${SECONDS} s)" | tee -a "$OUT/$name.log"
    local rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log" || rc=$?
    if ((rc == 0)); then
        STATUS[$name]="ok"
    elif ((rc == 124 || rc == 137)); then
        STATUS[$name]="TIMED OUT after ${limit} s"
    else
        STATUS[$name]="FAILED (exit $rc)"
    fi
    echo "=== $name: ${STATUS[$name]} (t=${SECONDS} s)" | tee -a "$OUT/$name.log"
}

# --- 1. environment: wheels, GPU, versions -------------------------------------------------------
env_step() {
    local failed=0
    if [[ $DRY == 0 && -n ${GPU_CHECK_SITE:-} ]]; then
        echo "packages from $GPU_CHECK_SITE ($(du -sh "$GPU_CHECK_SITE" | cut -f1))"
    elif [[ $DRY == 0 ]]; then
        local wheels=(.whl/*.whl)
        echo "installing ${#wheels[@]} wheels ($(du -sh .whl | cut -f1)) into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}" || { failed=1; echo "!!! PIP INSTALL FAILED"; }
    fi
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, platform, sys
print("python", sys.version.split()[0], sys.executable, "cpus", os.cpu_count(), platform.platform())
print("PYTHONPATH", os.environ.get("PYTHONPATH"))
for dist in ["torch", "torchvision", "numpy", "onnx", "onnxruntime", "opencv-python-headless", "super-gradients",
             "torchmetrics", "setuptools", "pydantic", "SQLAlchemy", "alembic", "albumentations", "pycocotools",
             "onnxsim", "onnx_graphsurgeon", "huggingface_hub", "matplotlib", "pillow", "scipy"]:
    try:
        print(f"  {dist:24} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist:24} MISSING")
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import onnxruntime
print("onnxruntime providers", onnxruntime.get_available_providers())
EOF
    return $failed
}


# --- 2. imports -----------------------------------------------------------------------------------
import_step() {
    SUPER_GRADIENTS_LOG_DIR=$TMPDIR/import-sglogs "$PY" - <<'EOF'
import importlib, sys, time, traceback
failed = []
def check(name):
    start = time.perf_counter()
    try:
        importlib.import_module(name)
        print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", file=sys.__stdout__, flush=True)
    except BaseException as exc:
        failed.append(name)
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", file=sys.__stdout__, flush=True)
        traceback.print_exc(file=sys.__stdout__)
for name in ["super_gradients", "super_gradients.training", "super_gradients.conversion",
             "onnx_graphsurgeon", "onnxsim", "app.ml.training", "app.ml.callbacks", "app.ml.sg_logger",
             "app.ml.checkpoints", "app.ml.inference", "app.ml.export", "worker.train_process", "app.migrate",
             "bench.harness", "tests.support"]:
    check(name)
try:
    from super_gradients.training import Trainer, models  # noqa: F401
    print("ok   from super_gradients.training import models, Trainer", file=sys.__stdout__)
except BaseException as exc:
    failed.append("models, Trainer")
    print(f"FAIL models, Trainer: {exc}", file=sys.__stdout__)
if failed:
    print(f"IMPORT FAILURES: {failed}", file=sys.__stdout__)
    sys.exit(1)
EOF
}
# Steps run in child shells: `timeout` runs programs, not functions.
export DRY PY
export -f env_step import_step
if [[ $DRY == 0 ]]; then
    export PYTHONPATH=${GPU_CHECK_SITE:-/tmp/site}:$REPO
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
step env 150 bash -c env_step
step import 120 bash -c import_step
if [[ ${STATUS[import]} != ok ]]; then
    echo "!!! imports failed (see import.log above); running the measurements anyway: each reports its own error"
fi

MEASURE=${GPU_CHECK_STEPS:-fork http predict train}   # which measurements to run

# --- 3a. warm start: jobs in children of the fork server on the device ------------------------------
[[ " $MEASURE " == *" fork "* ]] &&
    step fork 120 bash -c 'set -o pipefail; "$PY" -m bench.gpu_fork --device "$1" --json "$2/fork.json" | tee "$2/fork.md"' \
    _ "$DEVICE" "$OUT"

# --- 3. the whole service: warm /predict over HTTP on the device ------------------------------------
if [[ " $MEASURE " == *" http "* ]]; then
    for size in "${HTTP_SIZES[@]}"; do
        step "http-$size" 170 "$PY" -m bench.predict_latency --device "$DEVICE" --input-size "$size" \
            "${HTTP_ARGS[@]}" --markdown "$OUT/http.md"
    done
fi

# --- 4. predict latency, in process -----------------------------------------------------------------
[[ " $MEASURE " == *" predict "* ]] &&
    step predict 200 "$PY" -m bench.gpu_predict predict --device "$DEVICE" "${PREDICT_ARGS[@]}" --json "$OUT/predict.json"

# --- 5. training throughput ------------------------------------------------------------------------
TRAIN_LIMIT=$(($(left) - 25))
[[ " $MEASURE " == *" train "* ]] &&
    step train "$TRAIN_LIMIT" "$PY" -m bench.gpu_predict train --device "$DEVICE" "${TRAIN_ARGS[@]}" \
    --deadline-s $((TRAIN_LIMIT - 30)) --json "$OUT/train.json"

# --- 6. summary ------------------------------------------------------------------------------------
summary() {
    OUT="$OUT" STEPS="$(for k in "${ORDER[@]}"; do echo "$k: ${STATUS[$k]:-not run}"; done)" \
        DRY="$DRY" "$PY" - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
lines = ["# Issue 13 GPU check" + (" (CPU dry run, tiny sizes)" if os.environ["DRY"] == "1" else ""), "",
         "Steps: " + "; ".join(os.environ["STEPS"].splitlines()), ""]
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as exc:
        lines.append(f"{name}: not available ({type(exc).__name__})")
        return None
p = load("predict.json")
if p:
    lines += [f"## Predict latency, one 1280x960 image (device {p.get('device')}, {p.get('gpu')}; torch {p.get('torch')}, "
              f"onnxruntime {p.get('onnxruntime')} providers {p.get('ort_providers')}; {p.get('cpus')} CPUs)", "",
              "| size | way | median ms | p95 ms | n | detections |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for size, ways in p["sizes"].items():
        for way, s in ways.items():
            if isinstance(s, dict) and "median_ms" in s:
                lines.append(f"| {size} | {way} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['n']} | {s.get('detections', '')} |")
        if "export" in ways:
            e = ways["export"]
            lines.append(f"| {size} | (export: {e['seconds']:.1f} s, {e['mb']:.1f} MB, input {e['input_shape']} {e['input_dtype']}) | | | | |")
    for k, v in p.get("errors", {}).items():
        lines.append(f"- error {k}: {v[:300]}")
    lines.append("")
t = load("train.json")
if t:
    size = t["size"]
    lines += [f"## Training throughput: {size['model']} {size['input_size']} px, AMP, batch {size['batch_size']}, "
              f"{size['images']} train / {size['val_images']} valid images, {size['epochs']} epochs, "
              f"dataloader workers {t['dataloader_workers']}, device {size['device']}", "",
              "| run | device | images/s | window s | median batch ms | wall s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for kind in ("plain", "service"):
        for i, r in enumerate(t["runs"][kind]):
            lines.append(f"| {kind} {i + 1} | {r.get('device')} | {r['images_per_second']:.1f} | {r['window_s']:.1f} | "
                         f"{r['median_batch_ms']:.1f} | {r['wall_s']:.1f} |")
    m = t.get("median_images_per_second", {})
    lines.append("")
    if "ratio_of_medians" in t:
        lines.append(f"Median images/s: plain {m['plain']:.1f}, service {m['service']:.1f}; service/plain "
                     f"{t['ratio_of_medians']:.3f} (paired: {', '.join(f'{x:.3f}' for x in t['paired_ratios'])})")
    for e in t.get("errors", []):
        lines.append(f"- error: {e[:1500]}")
fork = out / "fork.md"
if fork.exists():
    lines += ["", fork.read_text()]
http = out / "http.md"
if http.exists():
    lines += ["", http.read_text()]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
}
echo "=== summary (t=${SECONDS} s)"
summary || echo "summary failed"
rm -rf "$SCRATCH"
ls -la "$OUT"
