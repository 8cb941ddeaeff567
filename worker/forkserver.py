"""The fork server of a worker's training processes (`worker.standby`): `python -m worker.forkserver
--standby=...`, its stdin a Unix socket to the worker.

It imports torch, super-gradients and what a training uses once (every model's architecture
parameters composed, and `worker.train_process`, which a child runs around its training), then forks
one child ahead of the next attempt. The child sets up the device, checks that it can compute after
the fork, says it is ready and waits for its attempt; given one, it takes its output, working
directory, super-gradients' logs and command line over for the job (as a process started for it has
them) and trains it with `worker.train_process.run_attempt`. The fork server reaps each child and
tells the worker how it ended; the next child is forked once the last training has ended.

What a fork must not carry over, and how it is kept out, is `app.ml.forking`'s. No database
connection is open in the fork server: nothing here touches the database before a fork.

A child that fails its check or dies before its attempt turns forking off for this fork server: it
then sets the device up itself and trains the next attempt in its own process, as a spare (it is
used up then, and the worker starts another).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from app.jobs import files
from app.process import set_parent_death_signal
from app.settings import Settings, get_settings
from worker.runner import TRAIN_COMMAND, TRAIN_PROCESS_MODULE
from worker.standby import FORK_SERVER_MODULE, READY_FILE, STANDBY_ARG, receive_message, send_message

logger = logging.getLogger("sgjobs.forkserver")
_STARTED_AT = datetime.now(UTC).isoformat()
# How long a forked child may take to set the device up and pass its check (a CUDA context: seconds).
CHILD_READY_SECONDS = 300.0
# What a child says once it is ready, on its own socket to the fork server.
READY = b"ready\n"
# How every line that says the fork server stopped forking ends (a benchmark looks for it).
NOT_FORKING = "not forking"
# (job_id, attempt, what the warm-start event says of the process) for `run_attempt`.
Taken = tuple[str, int, dict[str, Any]]


def _set_command_line(job_id: str, attempt: int) -> None:
    """Show `worker.train_process JOB_ID ATTEMPT` in this process's command line (`ps`,
    /proc/PID/cmdline) in place of the fork server's module and `STANDBY_ARG`, as a process started
    for the attempt shows them. Best effort (Linux only)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read()
        placeholder = f"{FORK_SERVER_MODULE}\0{STANDBY_ARG}".encode()
        offset = cmdline.find(placeholder)
        room = len(placeholder)
        text = f"{TRAIN_COMMAND[-1]}\0{job_id}\0{attempt}".encode()
        if offset < 0 or len(text) > room or arg_start + offset + room > arg_end:
            return
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start + offset)
            mem.write(text.ljust(room, b"\0"))
    except (OSError, ValueError, IndexError):
        pass


def _take_over(settings: Settings, assignment: dict[str, Any]) -> tuple[str, int]:
    """Make this process the attempt's: its working directory, output, super-gradients' logs and
    command line move to the job, as if it had been started for it."""
    job_id, attempt = str(assignment["job_id"]), int(assignment["attempt"])
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], job_id, str(attempt)]
    os.chdir(job_dir)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    console = os.open(files.console_log(job_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(console, 1)
    os.dup2(console, 2)
    os.close(console)
    from app.ml.sg_setup import move_sg_logs

    move_sg_logs(files.sg_log_dir(job_dir))
    _set_command_line(job_id, attempt)
    return job_id, attempt


def _set_up_device(settings: Settings, threads: int) -> str | None:
    """Torch's own thread count back, and the device set up (None when that failed: the attempt meets
    the same error where a fresh process would, and fails as it would there)."""
    from app.ml.forking import restore_threads
    from app.ml.training import prewarm

    restore_threads(threads)
    try:
        return prewarm(settings.device)
    except Exception:
        traceback.print_exc()
        return None


@dataclass
class _Child:
    pid: int
    pidfd: int
    conn: socket.socket  # the fork server's end of the child's own socket
    ready: bool = False
    forked_at: float = 0.0


class ForkServer:
    """Serves the worker on `sock` (module docstring). `serve` returns in a child given its attempt
    (and in a fork server that trains an attempt itself), or None when the worker has gone."""

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.ready_file = Path.cwd() / READY_FILE
        self.started = time.monotonic()
        self.threads = 1

    def serve(self) -> Taken | None:
        from app.ml.forking import import_before_forking

        # What a child runs around its training (the attempt's bookkeeping, the dataset's checks) is
        # imported here too, not in each child once it has its job: 0.4 s of every start, measured.
        self.threads = import_before_forking(also=[TRAIN_PROCESS_MODULE])
        forking = self.settings.training_fork_server
        waiting: _Child | None = None
        running: _Child | None = None
        pending: dict[str, Any] | None = None
        while True:
            if forking and waiting is None and running is None:
                forked = self._fork()
                if isinstance(forked, tuple):
                    return forked  # in the child, with its attempt
                waiting = forked
            if not forking and running is None:
                if waiting is not None:
                    self._discard(waiting)
                    waiting = None
                return self._itself(pending)
            watched: list[Any] = [self.sock]
            if waiting is not None:
                watched += [waiting.pidfd, waiting.conn]
            if running is not None:
                watched.append(running.pidfd)
            timeout = None
            if waiting is not None and not waiting.ready:
                timeout = max(0.0, waiting.forked_at + CHILD_READY_SECONDS - time.monotonic())
            readable, _, _ = select.select(watched, [], [], timeout)
            if not readable and waiting is not None and not waiting.ready:
                waited = f"{CHILD_READY_SECONDS:.0f} s"
                print(f"fork server: child {waiting.pid} not ready in {waited}; {NOT_FORKING}")
                forking = False
                continue
            if self.sock in readable:
                received = receive_message(self.sock)
                if received is None:
                    return None  # the worker has gone (its children get SIGTERM with this process)
                pending = received[0]
            if waiting is not None and waiting.conn in readable:
                if waiting.conn.recv(len(READY)) != READY:
                    print(f"fork server: child {waiting.pid} failed its check; {NOT_FORKING}")
                    forking = False
                    continue
                waiting.ready = True
                self.ready_file.write_text(f"{time.monotonic() - self.started:.2f}\n")
            if waiting is not None and waiting.pidfd in readable:
                print(f"fork server: child {waiting.pid} exited before its attempt; {NOT_FORKING}")
                self._discard(waiting)
                waiting, forking = None, False
                continue
            if running is not None and running.pidfd in readable:
                _, status = os.waitpid(running.pid, 0)
                returncode = os.waitstatus_to_exitcode(status)
                send_message(self.sock, {"exited": running.pid, "returncode": returncode})
                os.close(running.pidfd)
                running = None
            if pending is not None and waiting is not None and waiting.ready:
                waiting.conn.sendall(json.dumps(pending).encode() + b"\n")
                self.ready_file.unlink(missing_ok=True)
                send_message(self.sock, {"started": waiting.pid}, [waiting.pidfd])
                waiting.conn.close()
                running, waiting, pending = waiting, None, None
                self.started = time.monotonic()

    def _fork(self) -> _Child | Taken:
        ours, theirs = socket.socketpair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                return self._child(theirs, parent)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        theirs.close()
        return _Child(pid=pid, pidfd=os.pidfd_open(pid), conn=ours, forked_at=time.monotonic())

    def _child(self, conn: socket.socket, parent: int) -> Taken:
        """In a forked child: set up, say so, wait for the attempt and take it over."""
        os.setsid()  # a session of its own, as a training process started with start_new_session
        set_parent_death_signal()
        if os.getppid() != parent:
            os._exit(0)  # the fork server died in between
        # The worker's socket is the fork server's alone: stdin becomes /dev/null, as a fresh process's.
        self.sock.detach()
        devnull = os.open(os.devnull, os.O_RDONLY)
        if devnull != 0:
            os.dup2(devnull, 0)
            os.close(devnull)
        from app.ml.forking import after_fork, usable_after_fork

        after_fork()
        device = _set_up_device(self.settings, self.threads)
        problem = usable_after_fork(device)
        if problem is not None:
            print(f"fork server child: {problem}")
            os._exit(3)
        ready = time.monotonic()
        conn.sendall(READY)
        with conn.makefile("rb") as lines:
            line = lines.readline()
        conn.close()
        if not line:
            os._exit(0)  # the fork server has gone
        job_id, attempt = _take_over(self.settings, json.loads(line))
        return job_id, attempt, self._warm(ready, device, fork_server=parent)

    def _itself(self, pending: dict[str, Any] | None) -> Taken | None:
        """Train the next attempt in this process (a spare): set up, wait for it, take it over."""
        device = _set_up_device(self.settings, self.threads)
        self.ready_file.write_text(f"{time.monotonic() - self.started:.2f}\n")
        ready = time.monotonic()
        if pending is None:
            received = receive_message(self.sock)
            if received is None:
                return None
            pending = received[0]
        self.ready_file.unlink(missing_ok=True)
        send_message(self.sock, {"started": os.getpid(), "itself": True})
        job_id, attempt = _take_over(self.settings, pending)
        return job_id, attempt, self._warm(ready, device, fork_server=None)

    @staticmethod
    def _warm(ready: float, device: str | None, *, fork_server: int | None) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "process_started": _STARTED_AT,
            "waited_s": round(time.monotonic() - ready, 3),
            "device": device,
            "fork_server": fork_server,
        }

    @staticmethod
    def _discard(child: _Child) -> None:
        try:
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(child.pid, 0)
        os.close(child.pidfd)
        child.conn.close()


def main() -> int:
    """Serve the worker; in a child (or as a spare), run the attempt it was given."""
    if sys.argv[1:] != [STANDBY_ARG]:
        print(f"usage: python -m {FORK_SERVER_MODULE} {STANDBY_ARG}", file=sys.stderr)
        return 2
    # Whatever super-gradients' import sets up, it finds what a fresh training process has.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    taken = ForkServer(settings, socket.socket(fileno=0)).serve()
    if taken is None:
        return 0
    from worker.train_process import run_attempt

    job_id, attempt, standby = taken
    try:
        code = run_attempt(settings, job_id, attempt, standby)
    except BaseException:  # run_attempt catches errors; this is a KeyboardInterrupt or a SystemExit
        traceback.print_exc()
        code = 1
    exit_quickly(code)


def exit_quickly(code: int) -> NoReturn:
    """End a process that trained an attempt: Python's exit handlers (logging's flush among them) and
    its streams, then `os._exit`, without the C/C++ libraries' destructors.

    A forked child must not run those: the fork server's imports started threads of other libraries
    (onnxruntime's two, through super-gradients' import of onnxsim; pyarrow's jemalloc thread), which
    do not exist in a child. onnxruntime's static destructors then wait in `pthread_cond_destroy` for
    a waiter that never comes: every child hung at exit until its worker stopped it 30 s after the
    outcome was recorded, holding the worker (and its device memory) that long. A spare that trained
    an attempt itself ends the same way: the process is discarded, nothing in it is worth tearing down.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
