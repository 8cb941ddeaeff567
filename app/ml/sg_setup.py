"""Setting up a process that runs super-gradients: its environment and its device.

Both rules live here once, for the training process and the inference process alike, and so does
`remember_arch_params`, which `setup_device` applies to every such process. This module's top level
imports only the standard library (the worker and the API import it to start those processes);
torch and super-gradients are imported inside `setup_device` and `remember_arch_params` only.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import Settings

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# SG's console output in a child's log: warnings by default; an operator's CONSOLE_LOG_LEVEL wins.
DEFAULT_CONSOLE_LEVEL = "WARNING"
# torch reads both at every torch.load. Forced weights-only loading holds even where a caller passes
# weights_only=False (torch.hub's loader does): whatever a checkpoint holds, no pickled code runs.
# The other would make every load that passes nothing (most of super-gradients') unpickle anything,
# so a child never inherits it, whatever the operator's environment says (torch refuses both together).
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNSAFE_LOAD_VARIABLES: tuple[str, ...] = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)
# glibc's malloc, left to its defaults, gives every freed block over its adaptive mmap threshold (at
# most 32 MiB) back to the kernel and trims the heap's free top, so the next batch's tensors, of the
# same sizes, fault the same memory back in page by page: 80,000 faults a second and a tenth of a
# 2-core training's time in the kernel, measured here. A training process keeps freed memory for the
# next batch instead: nothing mmap'd, the heap's top given back only past 256 MiB free (64 MiB was
# slower at 256 px, 1 GiB no faster). 8-12% more images/s on the CPU at 64 and 256 px, about 5% more
# peak memory (BENCHMARKS.md, "Training and glibc's malloc"). Not for the inference process, whose
# evicted models' memory must go back.
TRAINING_MALLOC: dict[str, str] = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def sg_environment(log_dir: Path, *, console_level: str = DEFAULT_CONSOLE_LEVEL) -> dict[str, str]:
    """The variables super-gradients reads when it is first imported, for a process that will import it.

    No crash handler (it wraps `sys.excepthook`), SG's own log files in `log_dir` (created here)
    instead of `~/sg_logs`, SG's console output at `console_level` unless CONSOLE_LOG_LEVEL is set
    in this process's environment, and unbuffered output so that a redirected log is current.
    Also no update check by albumentations (imported by SG), which otherwise asks PyPI for its latest
    version over the network on every import, in every training and inference process; and
    weights-only loading forced (`FORCE_WEIGHTS_ONLY`).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    return {
        "CRASH_HANDLER": "FALSE",
        "CONSOLE_LOG_LEVEL": os.environ.get("CONSOLE_LOG_LEVEL", console_level),
        "SUPER_GRADIENTS_LOG_DIR": str(log_dir),
        "PYTHONUNBUFFERED": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        FORCE_WEIGHTS_ONLY: "1",
    }


def child_environment(
    log_dir: Path,
    *,
    console_level: str = DEFAULT_CONSOLE_LEVEL,
    extra: Mapping[str, str] | None = None,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment of a child process that runs super-gradients (training, inference):
    `parent`'s (default: this process's) without `UNSAFE_LOAD_VARIABLES`, then `extra`, then
    `sg_environment`."""
    inherited = os.environ if parent is None else parent
    env = {k: v for k, v in inherited.items() if k not in UNSAFE_LOAD_VARIABLES}
    return {**env, **(extra or {}), **sg_environment(log_dir, console_level=console_level)}


def training_environment(
    settings: Settings, log_dir: Path, *, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The whole environment of a process that trains (one started for an attempt, the fork server
    whose children train, a helper rank): `child_environment` with the settings' variables and
    `extra`, and glibc's malloc tuned for training (`TRAINING_MALLOC`) while
    `settings.training_malloc_tuning` is on; a variable of it that the operator set keeps its value."""
    env = child_environment(log_dir, extra={**settings.as_env(), **(extra or {})})
    if settings.training_malloc_tuning:
        for name, value in TRAINING_MALLOC.items():
            env.setdefault(name, value)
    return env


def prepare_this_process(log_dir: Path) -> None:
    """Set, in this process, whichever of `sg_environment`'s variables are not set yet, and force
    weights-only loading as a child gets it (`child_environment`).

    For a process that imports super-gradients itself (`run_training` called directly, as the
    tests do); must run before the first `import super_gradients`. A child started with
    `child_environment` already has them all, and keeps them.
    """
    for name, value in sg_environment(log_dir).items():
        os.environ.setdefault(name, value)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    for name in UNSAFE_LOAD_VARIABLES:
        os.environ.pop(name, None)
    Path(os.environ["SUPER_GRADIENTS_LOG_DIR"]).mkdir(parents=True, exist_ok=True)


def choose_device(requested: str, *, cuda_available: bool) -> str:
    """The device rule: "cpu" is the CPU; "cuda" is the GPU and an error without CUDA (never a silent
    fall-back to the CPU); "auto" is the GPU when CUDA is available, else the CPU."""
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cuda" and not cuda_available:
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    return requested


def setup_device(requested: str, world_size: int = 1) -> str:
    """Choose the device by `choose_device` and make it super-gradients' process-global device.

    `world_size` 1: one device, SG's DDP off (its DDP would re-launch `sys.argv`). More: this process
    is one rank of a data-parallel job, its rank in its environment (`app.ml.distributed.join`).
    Returns "cpu" or "cuda"; raises ValueError for "cuda" without CUDA (or with fewer GPUs than
    `world_size`). Imports torch and super-gradients.
    """
    import torch
    from super_gradients import setup_device as sg_setup_device
    from super_gradients.common.data_types.enum.multi_gpu_mode import MultiGPUMode

    remember_arch_params()
    device = choose_device(requested, cuda_available=torch.cuda.is_available())
    if world_size > 1:
        from app.ml.distributed import join

        join(device, world_size)
        return device
    sg_setup_device(device=device, multi_gpu=MultiGPUMode.OFF, num_gpus=1 if device == "cuda" else 0)
    return device


def remember_arch_params(preload: Iterable[str] = ()) -> None:
    """Make super-gradients compose each model's architecture parameters once per process, and
    compose `preload`'s (model names: "yolo_nas_s") now. Idempotent.

    Every `models.get("yolo_nas_s")` has SG compose `arch_params/yolo_nas_s_arch_params.yaml` with
    Hydra (`arch_params_factory.get_arch_params` calls `cfg_utils.load_arch_params`): 0.1-0.2 s of
    YAML parsing and config composition on these CPUs, each time, in every training's start and every
    model load for inference or export. The files belong to the installed package and do not change
    while a process runs, so the composed config is kept per file and each call gets a deep copy of
    it (SG's `get_arch_params` then instantiates and updates its copy as before). A fork server that
    preloads before forking hands the composed configs to every child.
    """
    from super_gradients.training.models import arch_params_factory

    load = arch_params_factory.load_arch_params
    if not isinstance(load, _RememberedArchParams):
        load = _RememberedArchParams(load)
        arch_params_factory.load_arch_params = load  # the name get_arch_params looks up at each call
    for model in preload:
        load(config_name=f"{model}_arch_params")


class _RememberedArchParams:
    """`cfg_utils.load_arch_params` with its composed configs kept (see `remember_arch_params`)."""

    def __init__(self, load: Any) -> None:
        self._composed = functools.cache(load)
        self._load = load

    def __call__(
        self, config_name: str, recipes_dir_path: str | None = None, overrides: list[str] | None = None
    ) -> Any:
        if overrides:  # a list (not a key); SG's own factory never passes any
            return self._load(config_name=config_name, recipes_dir_path=recipes_dir_path, overrides=overrides)
        return copy.deepcopy(self._composed(config_name=config_name, recipes_dir_path=recipes_dir_path))


def move_sg_logs(log_dir: Path) -> None:
    """Make super-gradients log into `log_dir` from now on, as if this process had imported it with
    SUPER_GRADIENTS_LOG_DIR=`log_dir`: its console sink's file (started anew, as an import does) and
    its log file. For a training process that imported SG before it had a job (`worker.standby`);
    what it logged before stays in its old folder.
    """
    import sys
    from datetime import datetime

    from super_gradients.common.auto_logging import console_logging
    from super_gradients.common.auto_logging.auto_logger import AutoLoggerConfig

    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ["SUPER_GRADIENTS_LOG_DIR"] = str(log_dir)
    sink = console_logging._console_sink
    sink._flush()  # what the sink holds was written before the job: to the old file
    filename = str(log_dir / "console.log")
    # The header SG's import writes (ConsoleSink._setup), so both kinds of start leave the same file.
    with open(filename, mode="w", encoding="utf-8") as f:
        f.write("============================================================\n")
        f.write(f"New run started at {datetime.now().strftime('%Y-%m-%d.%H:%M:%S.%f')}\n")
        f.write(f'sys.argv: "{" ".join(sys.argv)}"\n')
        f.write("============================================================\n")
    sink.filename = sink.stdout.filename = sink.stderr.filename = filename
    # Its import-time logging set-up again: a new log file in log_dir, the old handlers closed.
    AutoLoggerConfig.get_instance()._setup_default_logging()
