"""Forking training processes from one that has imported super-gradients (`worker.forkserver`).

Torch-side rules only; the fork server's protocol lives in `worker`. What a fork must not carry
over, and how each is kept out:

- An OpenMP thread pool. GNU libgomp's pool does not survive a fork: a child's first parallel region
  spins for ever on threads that exist only in the parent (seen here: a matmul in a child never
  returned, 100% of a core in `sched_yield`). Super-gradients' import runs parallel regions, so the
  parent imports with one intra-op thread (no pool) and each child sets torch's default back.
- A CUDA driver. Super-gradients' import asks `torch.cuda.is_available()`, which initialises the
  driver and makes CUDA unusable in every child, unless `PYTORCH_NVML_BASED_CUDA_CHECK` makes it ask
  NVML instead (set for the imports only). Where NVML fails, as on a host without a GPU driver, torch
  falls back to the runtime and marks every child a "bad fork", which only matters for CUDA. The
  device is set up in the child, never in the parent (`usable_after_fork` checks).
- Other libraries' threads. Super-gradients' import starts two of onnxruntime's (it imports onnxsim,
  which imports onnxruntime) and pyarrow's jemalloc background thread; a child has none of them.
  No training runs onnxruntime, and jemalloc has fork handlers of its own, but onnxruntime's
  static destructors wait at exit for a condition variable its thread waited on in the parent:
  forked children leave with `os._exit` after Python's own exit handlers
  (`worker.forkserver.exit_quickly`), never through the C libraries' destructors.
- Random state: each child reseeds numpy's and torch's global generators (Python's `random` reseeds
  itself after a fork), as a fresh process starts with its own.
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Iterable

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def import_before_forking(also: Iterable[str] = ()) -> int:
    """Import what a training uses, and the modules named in `also` (what the caller's children run
    around a training), without an OpenMP pool or a CUDA driver; returns torch's default number of
    intra-op threads, which `after_fork` gives each child back."""
    nvml_before = os.environ.get(NVML_CHECK)
    os.environ[NVML_CHECK] = "1"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from app.ml.training import import_training_modules

    import_training_modules()
    for module in also:
        importlib.import_module(module)
    if nvml_before is None:
        os.environ.pop(NVML_CHECK, None)
    else:
        os.environ[NVML_CHECK] = nvml_before
    # What the imports made lives as long as the process: out of the collector's sight, a full
    # collection (while a job indexes its dataset, say) no longer walks over it, nor writes to its
    # pages (which a fork shares until they are written).
    gc.collect()
    gc.freeze()
    return threads


def restore_threads(threads: int) -> None:
    """Torch's own number of intra-op threads back (`import_before_forking` ran with one)."""
    import torch

    torch.set_num_threads(threads)


def after_fork() -> None:
    """In a forked child, before anything else: random generators of its own."""
    import numpy
    import torch

    numpy.random.seed()
    torch.seed()


def usable_after_fork(device: str | None) -> str | None:
    """Why a forked child cannot train on `device` (as `prewarm` set it up; None: it could not), or
    None when it can: CUDA poisoned by the parent, or a parallel region that never returns (an
    OpenMP pool carried over; the caller gives up on a child that does not answer in time)."""
    import torch

    if torch.cuda._is_in_bad_fork() and device != "cpu":
        return "CUDA was initialised before the fork; the device cannot be used"
    (torch.ones(1 << 20) * 2).sum()  # ATen's parallel_for: OpenMP with more than one thread
    return None
