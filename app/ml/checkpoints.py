"""Safe loading of super-gradients checkpoints under torch's `weights_only=True` default.

torch >= 2.6 refuses every global that is not allow-listed. SG's own files need a few numpy
globals (the `averaging_snapshots.pkl` of `average_best_models` stores a numpy metric array), so we
allow exactly those, scoped to a `with` block, instead of the process-wide
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` that would make every load unsafe.

Also: `CheckpointPublisher`, the all-or-nothing, lease-fenced write every checkpoint goes through, and
`pick_resume_checkpoint` / `read_resume_point`, which choose and describe the checkpoint a job's
next attempt resumes from.

Imports torch at its top (not super-gradients): import it only inside the training or inference
process, never in the API or the worker's main process.
"""

from __future__ import annotations

import errno
import importlib
import math
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from app import failpoints
from app.ml.architectures import CLS_PRED_KEY
from app.ml.layout import BEST_CHECKPOINT, resume_candidates, temp_path
from app.ml.types import DiskFull, LeaseLost, greater_is_better

MODULE_PREFIX = "module."


def _numpy_globals() -> list[Any]:
    """The numpy globals SG's `averaging_snapshots.pkl` needs (its float64 `snapshots_metric` array).

    Found by experiment: without any of the four, loading fails. Training checkpoints need none as
    long as class names are plain `str`.
    """
    # numpy 1.x keeps the pickling helpers in numpy.core, 2.x in numpy._core.
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float64DType]


@contextmanager
def sg_safe_globals() -> Iterator[None]:
    """Allow, inside the block only, the numpy globals SG's checkpoints and snapshots contain."""
    with torch.serialization.safe_globals(_numpy_globals()):
        yield


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True` and the scoped SG globals."""
    with sg_safe_globals():
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict but {type(ckpt).__name__}")
    return ckpt


def model_state(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The weights super-gradients loads from a checkpoint dict, and where they were: `ema_net` when
    the file has one (`models.get(checkpoint_path=...)` prefers it), else `net`, else the dict itself
    (a bare state dict). A DDP `module.` prefix on every key is dropped, as SG drops it."""
    layout = "ema_net" if "ema_net" in ckpt else "net" if "net" in ckpt else "state_dict"
    state = ckpt[layout] if layout != "state_dict" else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"'{layout}' holds a {type(state).__name__}, not a state dict")
    if state and all(isinstance(k, str) and k.startswith(MODULE_PREFIX) for k in state):
        state = {k[len(MODULE_PREFIX) :]: v for k, v in state.items()}
    return layout, state


def checkpoint_num_classes(path: Path | str) -> int:
    """Number of classes of the YOLO-NAS head stored in the checkpoint at `path`.

    Accepts SG training checkpoints (`net`, `ema_net`) and bare state dicts; keys may carry a DDP
    `module.` prefix. Raises ValueError when the file holds no YOLO-NAS classification head.
    """
    _, state = model_state(load_checkpoint(path))
    value = state.get(CLS_PRED_KEY)
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return int(value.shape[0])
    raise ValueError(f"{path}: no '{CLS_PRED_KEY}' tensor; not a YOLO-NAS checkpoint")


# ---------------------------------------------------------------------------------------------
# Atomic, fenced writes
# ---------------------------------------------------------------------------------------------

# The checkpoint_write failpoint fires once this much of a file is written: a kill or ENOSPC there
# leaves a partial temporary file, the case the atomic write exists for.
FAILPOINT_AFTER_BYTES = 64 * 1024
# torch reports a failed write as a RuntimeError without errno ("file write failed", "unexpected
# pos"); with less free space than this (or than the file it replaces) that is taken as a full disk.
LOW_SPACE_BYTES = 16 * 1024 * 1024
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos")


class _CountingWriter:
    """The file object torch.save writes to: counts bytes, fires the failpoint after part of the data,
    and keeps the first error. torch's C++ writer turns an exception raised in `write` into a
    RuntimeError ("unexpected pos") that has lost the errno, so the original is re-raised from here."""

    def __init__(self, file: BinaryIO, failpoint: str | None, epoch: int | None) -> None:
        self.file = file
        self.failpoint = failpoint
        self.epoch = epoch
        self.written = 0
        self.fired = False
        self.error: BaseException | None = None

    def fire(self) -> None:
        """Hit the failpoint once (a kill ends the process here; ENOSPC/crash raise)."""
        if self.failpoint is not None and not self.fired:
            self.fired = True
            failpoints.hit(self.failpoint, epoch=self.epoch)

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        try:
            count = self.file.write(data)
            self.written += len(data)
            if self.written >= FAILPOINT_AFTER_BYTES:
                self.fire()
        except Exception as exc:
            self.error = exc
            raise
        return count

    def flush(self) -> None:
        self.file.flush()


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _is_disk_full(exc: BaseException, free: int | None, replaced_size: int) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        if "no space left" in message:
            return True
        if any(text in message for text in _TORCH_WRITE_FAILURES):
            return free is not None and free < max(LOW_SPACE_BYTES, replaced_size)
    return False


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**20:.1f} MiB"


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` the file now at `path`, leaving `path` in place (a hard link, then a rename),
    so there is no moment without a `path`. Without hard links, `path` is moved instead."""
    link = temp_path(previous)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


@contextmanager
def _without_zip_checksums() -> Iterator[None]:
    """`torch.save` inside the block writes no CRC-32 of its zip records (the fields hold 0).

    torch computes one over every byte it saves (miniz's, about 1.7 GB/s here): 100 of the 165 ms
    that a 171 MiB YOLO-NAS-S checkpoint took on the training thread, on every file of every epoch
    turn, where plain SG trains. No reader of ours ever checks it: torch builds miniz without its
    reader's CRC checks, so `torch.load` takes a file with a flipped data byte without a word
    (measured), with or without the checksums. What keeps a checkpoint whole here is the fsync
    before the rename. Only a zip tool's test (`unzip -t`) reads the zeros as errors.
    """
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _write_temporary(state: Any, tmp: Path, failpoint: str | None, epoch: int | None) -> None:
    """`torch.save(state)` into the new file `tmp` (the `failpoint` fires after part of it), without
    zip checksums (`_without_zip_checksums`)."""
    with _without_zip_checksums():
        with open(tmp, "xb") as file:
            if failpoint is not None and failpoints.armed(failpoint):
                writer = _CountingWriter(file, failpoint, epoch)
                try:
                    torch.save(state, writer)  # type: ignore[arg-type]  # any object with write()
                except Exception as exc:
                    if writer.error is not None:
                        raise writer.error from exc
                    raise
                writer.fire()  # a file smaller than FAILPOINT_AFTER_BYTES: fire before it is complete
                return
        # By name, torch writes from C++: a Python writer's call per record cost 40-60 ms more per
        # 80 MB here (every epoch's ckpt_latest.pth and more), measured.
        torch.save(state, str(tmp))


def _put_in_place(
    tmp: Path, path: Path, holds_lease: Callable[[], bool], keep_previous_as: Path | None
) -> None:
    """Make the complete temporary file `tmp` durable, then, if the lease is still held, `path`."""
    _fsync(tmp)
    if not holds_lease():
        raise LeaseLost(f"this attempt lost the job's lease: {path.name} not replaced")
    if keep_previous_as is not None and path.exists():
        _keep_previous(path, keep_previous_as)
    os.replace(tmp, path)
    _fsync(path.parent, os.O_DIRECTORY)  # the rename is durable only once the directory is synced


def _failed(exc: BaseException, tmp: Path, path: Path, replaced_size: int) -> BaseException:
    """Delete `tmp` after `exc` ended its write; what to raise: DiskFull for a full disk (caused by
    `exc`: it may be raised later, from another thread), else `exc`."""
    free = _free_bytes(path.parent)  # before the temporary file frees its space again
    tmp.unlink(missing_ok=True)
    if not _is_disk_full(exc, free, replaced_size):
        return exc
    intact = f"the previous {path.name} is intact" if path.exists() else f"there was no {path.name} yet"
    where = f"{path.name} in {path.parent} ({_mib(free)} free)"
    full = DiskFull(f"no space left to write {where}: {exc}; {intact}")
    full.__cause__ = exc
    return full


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class _Publication:
    tmp: Path
    path: Path
    holds_lease: Callable[[], bool]
    keep_previous_as: Path | None
    replaced_size: int


class CheckpointPublisher:
    """`torch.save(state, path)`, all or nothing, and only while this attempt holds the job's lease;
    the training thread waits only for the write.

    `save` writes a temporary file next to `path` (the `failpoint` fires after part of it, with
    `epoch`). One background thread then, in the order the files were saved, fsyncs it and asks
    `holds_lease()`: False means another attempt owns the job now, so the temporary file is deleted
    and LeaseLost raised. Otherwise the current `path` becomes `keep_previous_as` (when given), the
    temporary file is renamed to `path` and the directory fsynced. On any error the temporary file
    is deleted and `path` is untouched; a full disk (ENOSPC, EDQUOT, or torch's write failure with
    little free space) raises DiskFull, anything else propagates. A process killed mid-write leaves
    only a `*.tmp` file behind.

    Why a background thread: done in the training thread, those steps cost 0.1-0.3 s per epoch (3-4
    files of up to 171 MiB each for YOLO-NAS-S), time plain SG spends training (BENCHMARKS). Nothing
    is weaker for it: a file is put in place only complete, durable and under the lease, and a crash
    before that leaves the previous file and a `*.tmp` (deleted when the next attempt resumes).

    What a caller must know: a file is in place only once `wait(path)` (or `wait()`) returns, and a
    failure to put one in place (LeaseLost, DiskFull) is raised by the next `save` or `wait`; every
    file saved after a failure is dropped (its temporary file deleted), so the files in place never
    mix a run's older and newer epochs. A file has at most one save in flight: a second `save` of
    the same path waits for the first, so temporary files need at most one extra copy of each.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Publication] = deque()
        self._in_flight: dict[Path, int] = {}
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def save(
        self,
        state: Any,
        path: Path,
        *,
        holds_lease: Callable[[], bool],
        keep_previous_as: Path | None = None,
        failpoint: str | None = "checkpoint_write",
        epoch: int | None = None,
    ) -> None:
        """Write `state` to a temporary file next to `path` now; put it in place in the background.

        Raises an earlier save's failure first (every time: nothing is saved after one); a failure
        of this write itself (DiskFull, the failpoint) is raised here.
        """
        self.wait(path)
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise RuntimeError("CheckpointPublisher.save after close()")
        tmp = temp_path(path)
        replaced_size = _size(path)
        try:
            _write_temporary(state, tmp, failpoint, epoch)
        except BaseException as exc:
            error = _failed(exc, tmp, path, replaced_size)
            if error is exc:
                raise
            raise error  # noqa: B904  # _failed set its cause
        with self._cond:
            self._queue.append(_Publication(tmp, path, holds_lease, keep_previous_as, replaced_size))
            self._in_flight[path] = self._in_flight.get(path, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sgjobs-checkpoints", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait(self, path: Path | None = None) -> None:
        """Until `path` (every file when None) is in place or dropped; raises a failure not raised yet
        (LeaseLost, DiskFull, or what else stopped a file), of any file."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._in_flight.get(path) if path else self._in_flight))
            if self._error is not None and not self._reported:
                self._reported = True
                raise self._error

    def close(self) -> None:
        """`wait()` for every file, then end the background thread."""
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                thread = self._thread
            if thread is not None:
                thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                item = self._queue[0]
                failed = self._error is not None
            if failed:
                item.tmp.unlink(missing_ok=True)
            else:
                try:
                    _put_in_place(item.tmp, item.path, item.holds_lease, item.keep_previous_as)
                except BaseException as exc:
                    error = _failed(exc, item.tmp, item.path, item.replaced_size)
                    with self._cond:
                        self._error = error
            with self._cond:
                self._queue.popleft()
                self._in_flight[item.path] -= 1
                if not self._in_flight[item.path]:
                    del self._in_flight[item.path]
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

# What a checkpoint must hold for SG to resume from it (SG's ckpt_latest/ckpt_best have all three;
# average_model.pth has no optimizer state).
RESUME_KEYS = ("net", "epoch", "optimizer_state_dict")


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint a training run can continue from (`TrainingConfig.resume_from`).

    `next_epoch`: the 0-based index of the first epoch the resumed run trains (= the checkpoint's
    `epoch`, which SG stores as the number of epochs completed); metrics reported for epochs >=
    next_epoch by an earlier attempt are superseded. `best_value`: the best value of the watched
    metric `metric` over the epochs before next_epoch, per the checkpoint (None when it records
    none). `skipped`: the newer candidates that did not load, as "<path in the job>: why".
    """

    path: Path
    next_epoch: int
    best_value: float | None
    skipped: list[str] = field(default_factory=list)
    metric: str | None = None


@dataclass(frozen=True)
class BestSoFar:
    """The best value of the watched metric `metric` over the epochs a checkpoint has completed."""

    metric: str
    value: float


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if greater_is_better(metric) else a < b


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def best_so_far(ckpt: Mapping[str, Any]) -> BestSoFar | None:
    """The best watched metric over the epochs a checkpoint has completed, as far as it records it.

    SG stores the tracked metric's name in `metrics`, the epoch's own value in `acc`, and in
    `_best_ckpt_metrics` the best earlier epoch's validation metrics (taken before this epoch's
    comparison, so without the epoch itself; and, as `metrics["valid"]`, without loss values, so a
    watched loss has no earlier best here). The better of the two; None when no metric is recorded.
    """
    metrics = ckpt.get("metrics")
    name = metrics.get("tracked_metric_name") if isinstance(metrics, Mapping) else None
    if not isinstance(name, str):
        return None
    value = _finite(ckpt.get("acc"))
    earlier = ckpt.get("_best_ckpt_metrics")
    if isinstance(earlier, Mapping) and earlier.get("tracked_metric_name") == name:
        valid = earlier.get("valid")
        before = _finite(valid.get(name)) if isinstance(valid, Mapping) else None
        if before is not None and (value is None or _better(name, before, value)):
            value = before
    return None if value is None else BestSoFar(name, value)


def _load_for_resume(path: Path, *, mmap: bool) -> dict[str, Any]:
    with sg_safe_globals():
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise ValueError(f"not a checkpoint dict but {type(ckpt).__name__}")
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch {epoch!r} is not a count of epochs")
    return ckpt


def _best_checkpoint_so_far(path: Path, epochs: int) -> BestSoFar | None:
    """The value ckpt_best.pth next to `path` records, when it is from one of the first `epochs`
    epochs: the only record of a watched loss's best (see `best_so_far`). None if it does not load."""
    best_path = path.with_name(BEST_CHECKPOINT)
    if best_path == path or not best_path.is_file():
        return None
    try:
        with sg_safe_globals():
            ckpt = torch.load(str(best_path), map_location="cpu", weights_only=True, mmap=True)
        done = ckpt["epoch"]
        best = best_so_far(ckpt)
    except Exception:  # a damaged ckpt_best.pth tells nothing; pick_resume_checkpoint reports it
        return None
    return best if isinstance(done, int) and done <= epochs else None


def read_resume_point(path: Path, *, verify: bool = True) -> ResumePoint:
    """What resuming from the checkpoint at `path` means (its next epoch and best value so far).

    The best value so far is the better of the checkpoint's own record (`best_so_far`) and that of
    the run directory's ckpt_best.pth when it is not from a later epoch. `verify=True` loads the
    whole file (every tensor read); False maps it and reads the small entries only, which is enough
    once `pick_resume_checkpoint` has verified it. Raises ValueError, or torch's RuntimeError for an
    unreadable file.
    """
    ckpt = _load_for_resume(path, mmap=not verify)
    epochs = int(ckpt["epoch"])
    best = best_so_far(ckpt)
    del ckpt  # the tensors of a full load (hundreds of MB) are not needed any more
    other = _best_checkpoint_so_far(path, epochs)
    if other is not None and (
        best is None or (other.metric == best.metric and _better(best.metric, other.value, best.value))
    ):
        best = other
    return ResumePoint(
        path=path,
        next_epoch=epochs,
        best_value=best.value if best is not None else None,
        metric=best.metric if best is not None else None,
    )


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}"


def pick_resume_checkpoint(job_dir: Path) -> ResumePoint | None:
    """The checkpoint of this job to resume from: the newest epoch that actually loads.

    Candidates (`app.ml.layout.resume_candidates`): every run directory's ckpt_latest.pth, the
    kept previous one and ckpt_best.pth. Each is first opened cheaply (memory-mapped) to read its
    epoch; then, newest epoch first (ckpt_latest before the previous one before ckpt_best at the same
    epoch), each is loaded in full with weights_only=True and must hold net, epoch and
    optimizer_state_dict. Truncated or corrupt files are skipped for the one before; `skipped` says
    which and why. None when no candidate loads.
    """
    skipped: list[str] = []

    def name(path: Path) -> str:
        try:
            return path.relative_to(job_dir).as_posix()
        except ValueError:
            return str(path)

    ranked: list[tuple[int, int, Path]] = []
    for order, path in enumerate(resume_candidates(job_dir)):
        try:
            epoch = read_resume_point(path, verify=False).next_epoch
        except Exception as exc:  # whatever torch or the file throws: skip it, say why
            skipped.append(f"{name(path)}: {_why(exc)}")
            continue
        ranked.append((epoch, -order, path))
    for _, _, path in sorted(ranked, key=lambda item: item[:2], reverse=True):
        try:
            point = read_resume_point(path, verify=True)
        except Exception as exc:
            skipped.append(f"{name(path)}: {_why(exc)}")
            continue
        return ResumePoint(point.path, point.next_epoch, point.best_value, skipped, point.metric)
    return None
