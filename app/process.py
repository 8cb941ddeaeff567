"""Child-process helpers shared by the CLI and the worker."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


def set_parent_death_signal() -> None:
    """Get SIGTERM when the parent (the thread that forked this process) dies (Linux; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes a child get SIGTERM when its parent dies (Linux; None elsewhere).

    A worker or training process must not run on unsupervised after the process that owns it is gone.
    """
    return set_parent_death_signal if sys.platform == "linux" else None
