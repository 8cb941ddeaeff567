"""`worker.runner.ExitWatch`: a supervisor that waits for its training process without polling."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from worker.runner import ExitWatch


def _child(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def _wakeups() -> int:
    """This thread's voluntary context switches so far (each time it slept and woke)."""
    status = Path("/proc/thread-self/status").read_text()
    return int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])


def test_it_returns_the_exit_code_as_soon_as_the_process_exits() -> None:
    proc = _child(0.3)
    watch = ExitWatch(proc)
    try:
        started = time.monotonic()
        assert watch.wait(10.0) == 0
        assert time.monotonic() - started < 5.0
        assert watch.wait(10.0) == 0  # and again, at once
    finally:
        watch.close()


def test_it_times_out_with_none_and_sees_a_kill() -> None:
    proc = _child(60)
    watch = ExitWatch(proc)
    try:
        started = time.monotonic()
        assert watch.wait(0.3) is None
        assert time.monotonic() - started >= 0.29
        proc.send_signal(signal.SIGKILL)
        assert watch.wait(10.0) == -signal.SIGKILL
    finally:
        watch.close()
        proc.kill()
        proc.wait()


def test_a_wait_wakes_this_thread_once_not_every_few_milliseconds() -> None:
    proc = _child(60)
    watch = ExitWatch(proc)
    try:
        before = _wakeups()
        assert watch.wait(1.0) is None
        ours = _wakeups() - before
        before = _wakeups()
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        polling = _wakeups() - before
        # Popen.wait(timeout) sleeps at most 50 ms at a time: 20 and more wake-ups in a second.
        assert ours <= 3 < 15 <= polling, (ours, polling)
    finally:
        watch.close()
        proc.kill()
        proc.wait()
