"""Build what a lent GPU machine needs to run `bench/gpu_check.sh`, in parts that fit its calls.

    .venv/bin/python -m bench.gpu_carry                  # -> .gpu-carry-1/, .gpu-carry-2/, ...

The GPU image has Python 3.12, torch (CUDA 13) and many common packages, but no package registry,
no super-gradients and a CPU-only onnxruntime; one call carries at most 64 MiB. This collects, for
CPython 3.12 on x86-64:

- the project's packages the image lacks (`MISSING`), at the versions of this checkout's `.venv`;
- onnxruntime-gpu built for CUDA 13 (`--onnxruntime-gpu`, 255 MB as a wheel), cut down for Hopper:
  the CUDA provider's kernels for other GPUs are zeroed (its fatbin keeps every entry's header, so
  the driver still picks sm_90's), the C API library and the Python tools are left out;

installs them into one folder (`site/`), compresses it with xz and splits it into parts of
`--part-mb`, one folder each (`.gpu-carry-K/`, git-ignored). The first calls each copy their part
aside on the machine, which stays warm for 30 s between calls; the last one unpacks them all:

    call 1..N-1 (carry .gpu-carry-K):  mkdir -p /tmp/parts && cp .gpu-carry-K/* /tmp/parts/
    call N      (carry .gpu-carry-N):  cp .gpu-carry-N/* /tmp/parts/ && cat /tmp/parts/* | xz -d |
                                       tar xf - -C /tmp && GPU_CHECK_SITE=/tmp/site bash bench/gpu_check.sh

Measured 2026-11-27 (an H200): 90 MB in two parts; onnxruntime's CUDA provider ran from it. numpy
is not carried: the image's scipy needs numpy 2, and numpy 1.26 broke its import.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import mmap
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The distributions the image lacks that the service, its training process, super-gradients and the
# benches import (found by recording every module imported during `bench.predict_latency` and
# `bench/gpu_check.sh --cpu-dry-run`, less the image's package list in the device notes).
MISSING = (
    "albucore albumentations alembic amqp annotated-types antlr4-python3-runtime billiard boto3 botocore "
    "s3transfer jmespath celery click-didyoumean click-plugins click-repl data-gradients Deprecated dill "
    "fastapi greenlet httpcore2 httpx2 httptools hydra-core imagesize jsonschema jsonschema-specifications "
    "referencing rpds-py kombu Mako omegaconf onnx_graphsurgeon onnxsim opentelemetry-api prompt_toolkit "
    "pycocotools pydantic pydantic-settings pydantic_core python-dotenv python-multipart RapidFuzz simsimd "
    "stringcase stringzilla sse-starlette starlette SQLAlchemy termcolor treelib truststore "
    "typing-inspection tzlocal uvicorn vine wcwidth super-gradients torchmetrics"
).split()
# botocore describes every AWS service (most of its size); super-gradients and the store need these.
BOTOCORE_SERVICES = {"s3", "sts", "sso", "sso-oidc", "s3control"}
PLATFORMS = [
    f"manylinux{tag}_x86_64"
    for tag in ("_2_35", "_2_34", "_2_31", "_2_28", "_2_27", "_2_24", "_2_17", "2014", "_2_5", "1")
]
HOPPER_SM = 90
FATBIN_MAGIC = 0xBA55ED50


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _target_flags() -> list[str]:
    flags = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def fetch_wheels(wheels: Path) -> None:
    """The `MISSING` distributions at this environment's versions, as py3.12 x86-64 wheels (built
    here from source for the few published only as source)."""
    for name in MISSING:
        pin = f"{name}=={importlib.metadata.version(name)}"
        try:
            _pip("download", "-q", "--no-deps", *_target_flags(), "--platform", "any", "-d", str(wheels), pin)
        except subprocess.CalledProcessError:
            _pip("wheel", "-q", "--no-deps", "-w", str(wheels), pin)  # pure Python, source only


def keep_only_sm(library: Path, sm: int) -> int:
    """Zero every kernel image in `library`'s `.nv_fatbin` section that is not for `sm`, in place;
    the entries' headers stay, so the driver still finds the one it loads. Returns bytes zeroed."""
    readelf = ["readelf", "-S", "-W", str(library)]
    sections = subprocess.run(readelf, capture_output=True, text=True, check=True).stdout
    line = next(x for x in sections.splitlines() if ".nv_fatbin" in x)
    fields = line.split("]", 1)[1].split()
    start, size = int(fields[3], 16), int(fields[4], 16)
    zeroed = 0
    with open(library, "r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        pos, end = start, start + size
        while pos < end:
            magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
            if magic != FATBIN_MAGIC:
                pos += 8  # alignment padding between containers
                continue
            entry, last = pos + header, pos + header + fat
            while entry < last:
                _, _, entry_header, payload = struct.unpack_from("<HHII", data, entry)
                if struct.unpack_from("<I", data, entry + 28)[0] != sm:
                    body = entry + entry_header
                    data[body : body + payload] = bytes(payload)
                    zeroed += payload
                entry += entry_header + payload
            pos = last
    return zeroed


def add_onnxruntime_gpu(site: Path, version: str, work: Path) -> None:
    """onnxruntime-gpu `version` unpacked into `site`, cut down for Hopper (see the module docstring)."""
    _pip("download", "-q", "--no-deps", *_target_flags(), "-d", str(work), f"onnxruntime-gpu=={version}")
    wheel = next(work.glob("onnxruntime_gpu-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    package = site / "onnxruntime"
    for unused in ("transformers", "quantization"):
        shutil.rmtree(package / unused)
    for library in (package / "capi").glob("libonnxruntime.so.*"):
        library.unlink()  # the C API; Python's binding carries its own runtime
    zeroed = keep_only_sm(package / "capi" / "libonnxruntime_providers_cuda.so", HOPPER_SM)
    print(f"onnxruntime-gpu {version}: {zeroed / 1e6:.0f} MB of kernels for other GPUs zeroed")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnxruntime-gpu", default="1.31.1", help="a CUDA 13 build of onnxruntime-gpu")
    parser.add_argument("--part-mb", type=int, default=58, help="MB per part (a call carries 64 MiB)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="where the .gpu-carry-K folders go")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sgjobs-gpu-carry-"))
    try:
        wheels, site = work / "wheels", work / "site"
        fetch_wheels(wheels)
        _pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *_target_flags(),
             *map(str, sorted(wheels.glob("*.whl"))))  # fmt: skip
        add_onnxruntime_gpu(site, args.onnxruntime_gpu, work)
        for service in (site / "botocore" / "data").iterdir():
            if service.is_dir() and service.name not in BOTOCORE_SERVICES:
                shutil.rmtree(service)
        archive = work / "site.tar.xz"
        subprocess.run(f"tar cf - -C {work} site | xz -9 -T0 > {archive}", shell=True, check=True)
        for old in args.out.glob(".gpu-carry-*"):
            shutil.rmtree(old)
        part_bytes = args.part_mb * 1_000_000
        with open(archive, "rb") as whole:
            index = 0
            while chunk := whole.read(part_bytes):
                index += 1
                folder = args.out / f".gpu-carry-{index}"
                folder.mkdir()
                (folder / f"part.{index:02d}").write_bytes(chunk)
        print(f"{archive.stat().st_size / 1e6:.0f} MB in {index} parts: " + ", ".join(
            f".gpu-carry-{k}" for k in range(1, index + 1)))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
