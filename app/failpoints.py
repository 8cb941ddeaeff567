"""Named fault-injection points for the chaos tests (the idea of fail-rs / FreeBSD's fail points).

A failpoint is a place in the training process where a fault can be injected on request: the
real code runs, and at that point it fails the way the world would make it fail (a full disk, a
kill in the middle of a write, a crash of the whole worker). They are off unless the `failpoints` setting
(`SGJOBS_FAILPOINTS`) holds a JSON object, for example

    {"checkpoint_write": {"action": "enospc", "job_name": "full-disk"}}

Keys are point names (`POINTS`); each value (or each of a list of them, the first that matches
fires) says what to do (`action`, see `ACTIONS`) and may narrow where: `job_name` (the job spec's
name), `epoch`, `batch`, `attempt` (equal to), `times` (fire at most that many times per process).
The points say what their `epoch` means: `checkpoint_write` the epochs completed (SG's count),
`train_batch` SG's 0-based epoch index, with `batch` the 0-based batch index. The setting is read
once per process; the training process sets its context (job name, attempt) with `set_context`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from functools import lru_cache
from typing import Any

ENV_VAR = "SGJOBS_FAILPOINTS"  # the `failpoints` setting, named in error messages

POINTS = (
    # After part of a checkpoint's temporary file is written, before it is put in place.
    "checkpoint_write",
    # At the end of a training batch (after its progress is reported).
    "train_batch",
    # Before each try of a trained job's final upload to a remote store.
    "final_upload",
)
ACTIONS = (
    "enospc",  # raise OSError(ENOSPC), as a full disk would
    "kill",  # SIGKILL this process
    "kill_worker",  # SIGKILL this process and its parent (the worker that supervises it)
    "crash",  # raise RuntimeError
    "abort",  # SIGABRT this process, as a failed assertion in native code would
    "store_down",  # raise StorageError, as an unreachable object store would
)

_context: dict[str, Any] = {}
_fired: dict[tuple[str, int], int] = {}


class FailpointError(ValueError):
    """SGJOBS_FAILPOINTS names an unknown point or action."""


@lru_cache(maxsize=1)
def _config() -> dict[str, list[dict[str, Any]]]:
    from app.settings import get_settings

    raw = get_settings().failpoints.strip()
    if not raw:
        return {}
    config = json.loads(raw)
    if not isinstance(config, dict):
        raise FailpointError(f"{ENV_VAR} must be a JSON object of point name -> settings")
    specs: dict[str, list[dict[str, Any]]] = {}
    for name, value in config.items():
        if name not in POINTS:
            raise FailpointError(f"{ENV_VAR}: unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        specs[name] = value if isinstance(value, list) else [value]
        for spec in specs[name]:
            if not isinstance(spec, dict) or spec.get("action") not in ACTIONS:
                raise FailpointError(f"{ENV_VAR}: {name}.action must be one of {', '.join(ACTIONS)}")
    return specs


def reset() -> None:
    """Read the setting again on the next hit (tests that change it inside one process)."""
    from app.settings import get_settings

    get_settings.cache_clear()
    _config.cache_clear()
    _fired.clear()


def set_context(**context: Any) -> None:
    """Say which job and attempt this process runs (matched against `job_name` and `attempt`)."""
    _context.update(context)


def armed(name: str) -> bool:
    """True when the setting configures `name` (whatever its conditions): a caller may then take a
    slower path that lets the fault land where it would (a checkpoint written through a counter)."""
    return name in _config()


def hit(name: str, **where: Any) -> None:
    """Inject the configured fault if `name` is armed and its conditions match; else nothing."""
    facts = {**_context, **where}
    for index, candidate in enumerate(_config().get(name, [])):
        if any(
            key in candidate and facts.get(key) != candidate[key]
            for key in ("job_name", "epoch", "batch", "attempt")
        ):
            continue
        fired = _fired.get((name, index), 0)
        if "times" in candidate and fired >= int(candidate["times"]):
            continue
        _fired[(name, index)] = fired + 1
        _inject(name, candidate["action"])
        return


def _inject(name: str, action: str) -> None:
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (failpoint {name})")
    if action == "store_down":
        from app.storage import StorageError

        raise StorageError(f"the object store did not answer (failpoint {name})")
    if action == "crash":
        raise RuntimeError(f"failpoint {name}: injected crash")
    if action == "kill_worker":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGABRT if action == "abort" else signal.SIGKILL)
