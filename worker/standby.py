"""A warm training process per worker: a fork server that has imported super-gradients (a warm start).

Importing torch and super-gradients and setting up the device take seconds, most of a job's wait
between its claim and its first batch. Each worker keeps one fork server (`worker.forkserver`): a
process started with the environment a training process gets (`app.ml.sg_setup.training_environment`),
logging into a folder of its own under `STANDBY_DIR`, that imports all of that once. It forks one
child ahead of the next attempt, which sets up the device and waits; a claimed attempt is handed to
that child (`StandbySlot.take`), which moves its output and super-gradients' logs into the job
directory (`worker.train_process`) and trains as a process started for the job would. It is still
one process per attempt, which exits when the attempt ends: nothing a training sets process-wide
reaches the next job, and the fork server itself never trains. The next child is forked once the
training has ended, not while it runs (its device set-up would take CPU from that training).

The worker and its fork server talk over a Unix socket (the fork server's stdin): the worker sends
`{"job_id": ..., "attempt": ...}`; the fork server answers `{"started": PID}` with a pidfd of the
child (`ForkedTraining` signals it through that, never by a pid that could have been reused), and
`{"exited": PID, "returncode": RC}` once it has reaped it (a returncode as `Popen.returncode` gives).
Where forking cannot be trusted (the pre-forked child's check fails: a device that cannot be used
after a fork, say) or `training_fork_server` is off, the fork server is a spare instead: it sets up
the device itself, takes one attempt (`{"started": its own PID, "itself": true}`) and is used up.

With `training_spare` the fork server starts with the worker, so that even its first job starts
warm; without, at the first claim (that job waits for the imports as a fresh process would, the
next ones do not). A fork server that died, or was started with another environment or older code
than a training process would get now, is discarded; the attempt goes to a new one (or, with
`training_fork_server` off, to a fresh process).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import app
import worker
from app.ml.sg_setup import training_environment
from app.process import die_with_parent
from app.settings import Settings

logger = logging.getLogger(__name__)

# Under the service's home: one folder per fork server (its output and super-gradients' logs), removed
# when it is discarded (or, for a spare that took an attempt itself, when that attempt ends).
STANDBY_DIR = "standby"
# Written into a fork server's folder once a job claimed now would start at once (the benchmark and
# the tests wait for it); it holds the seconds that took.
READY_FILE = "ready"
STANDBY_OUTPUT = "output.log"
STANDBY_SG_LOGS = "logs"
FORK_SERVER_MODULE = "worker.forkserver"
# The fork server's last argument: room that its training children overwrite with
# `worker.train_process JOB_ID ATTEMPT`, so that `ps` (and whoever looks for a job's training process by
# its command line) sees them as processes started for the attempt.
STANDBY_ARG = "--standby" + "=" * 96
STANDBY_COMMAND: list[str] = [sys.executable, "-m", FORK_SERVER_MODULE, STANDBY_ARG]
# The variable that differs between two training processes of the same worker by design.
_PER_PROCESS_VARIABLES = ("SUPER_GRADIENTS_LOG_DIR",)
# The largest message either side sends (a datagram of the socket).
MESSAGE_BYTES = 4096


def code_stamp() -> int:
    """The newest modification time of the service's Python sources (ns): a fork server started
    before a deploy that changed them would run the old code."""
    newest = 0
    for package in (app, worker):
        for path in Path(package.__file__ or "").parent.rglob("*.py"):
            with contextlib.suppress(OSError):
                newest = max(newest, path.stat().st_mtime_ns)
    return newest


def environment_key(env: dict[str, str]) -> str:
    """What a training process's environment and code are, less what differs per process by design."""
    kept = sorted((k, v) for k, v in env.items() if k not in _PER_PROCESS_VARIABLES)
    return hashlib.sha256(json.dumps([kept, code_stamp()]).encode()).hexdigest()


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """One message (a datagram of JSON), with file descriptors passed along (SCM_RIGHTS)."""
    data = json.dumps(message).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None once the other side has gone."""
    data, ancillary, _flags, _address = sock.recvmsg(MESSAGE_BYTES, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), fds


@dataclass
class Standby:
    """A fork server: its process, the worker's end of its socket, its folder, what it was started
    with, and whether it has been used up (a spare that took an attempt itself)."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    directory: Path
    key: str
    used_up: bool = False

    def usable(self) -> bool:
        return not self.used_up and self.proc.poll() is None

    def discard(self) -> None:
        """Stop the process (if alive; its children get SIGTERM with it) and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class ForkedTraining:
    """The training process of one attempt, as handed to a fork server: what the supervisor uses of a
    `subprocess.Popen` (`pid`, `poll`, `wait`, `terminate`, `kill`, `returncode`).

    Until the fork server has forked it (it may still be importing), `pid` is the fork server's, and
    stopping the attempt stops the fork server. How it ended comes from the fork server, which reaps
    it; when the fork server dies first, the child gets SIGTERM with it and ends as terminated.
    """

    def __init__(self, server: Standby) -> None:
        self.server = server
        self.returncode: int | None = None
        self.itself = False  # the fork server trains it itself (a spare)
        self._child: int | None = None
        self._pidfd: int | None = None

    @property
    def pid(self) -> int:
        return self._child if self._child is not None else self.server.proc.pid

    @property
    def started(self) -> bool:
        """Whether a process trains the attempt (forked, or the spare itself)."""
        return self._child is not None or self.itself

    def _read(self, timeout: float) -> None:
        """Take in what the fork server has said, waiting up to `timeout` seconds for a first message."""
        sock = self.server.sock
        while self.returncode is None:
            try:
                ready, _, _ = select.select([sock], [], [], timeout)
            except (OSError, ValueError):  # closed by `discard`
                ready = [sock]
            if not ready:
                return
            timeout = 0
            try:
                received = receive_message(sock)
            except (OSError, ValueError):
                received = None
            if received is None:
                self._server_gone()
                return
            message, fds = received
            if "started" in message:
                self.itself = bool(message.get("itself"))
                if self.itself:
                    self.server.used_up = True
                else:
                    self._child = int(message["started"])
                    self._pidfd = fds.pop(0) if fds else None
            elif "exited" in message and int(message["exited"]) == self._child:
                self.returncode = int(message["returncode"])
                self._close_pidfd()
            for fd in fds:
                os.close(fd)

    def _server_gone(self) -> None:
        if self._child is None:
            # Not forked (or trained by the spare itself): the fork server's own exit is the attempt's.
            self.returncode = self.server.proc.wait()
            return
        # The child got SIGTERM when its parent died (`die_with_parent`); nobody reaps it for us.
        logger.warning("fork server %d died while its child %d trained", self.server.proc.pid, self._child)
        self._signal(signal.SIGTERM)
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], 10.0)
        self.returncode = -signal.SIGTERM
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.itself:
                self.returncode = self.server.proc.poll()
            else:
                self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(STANDBY_COMMAND, timeout or 0)
            if self.itself:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.server.proc.wait(timeout=left)
            else:
                self._read(60.0 if left is None else left)
        assert self.returncode is not None
        return self.returncode

    def _signal(self, sig: int) -> None:
        if self.itself or not self.started:
            # The spare trains it, or the fork server has not forked yet: stopping the attempt is
            # stopping the fork server (the slot replaces it).
            with contextlib.suppress(ProcessLookupError):
                self.server.proc.send_signal(sig)
        elif self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        if self.returncode is None:
            self._signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.returncode is None:
            self._signal(signal.SIGKILL)


def _host() -> str:
    # Workers on other hosts (containers) may share the home: their pids mean nothing here.
    return socket.gethostname().replace("@", "_").replace("/", "_")


def _remove_orphans(root: Path) -> None:
    """Remove the folders of fork servers whose worker on this host is gone (killed: its fork server
    got SIGTERM, its folder stayed). A folder's name is `HOST@PID-` of its worker and a random part."""
    host = _host()
    for folder in root.iterdir():
        owner_host, _, rest = folder.name.rpartition("@")
        pid = rest.split("-", 1)[0]
        if owner_host != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # alive (another user's): not ours to judge


def start_standby(settings: Settings) -> Standby:
    """Start a fork server for `settings`; it imports in the background."""
    root = settings.home / STANDBY_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root)
    directory = Path(tempfile.mkdtemp(prefix=f"{_host()}@{os.getpid()}-", dir=root))
    env = training_environment(settings, directory / STANDBY_SG_LOGS)
    key = environment_key(env)
    # Datagrams: one message per send, pidfds alongside.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with open(directory / STANDBY_OUTPUT, "ab") as output:
            proc = subprocess.Popen(
                STANDBY_COMMAND,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=theirs.fileno(),
                env=env,
                cwd=directory,
                start_new_session=True,
                # Started by the worker's main thread (the solo pool's task thread), which lives as long
                # as the worker: the signal comes when the worker dies.
                preexec_fn=die_with_parent(),
            )
    except BaseException:
        ours.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        theirs.close()
    logger.info("started a fork server for training processes (pid %d)", proc.pid)
    return Standby(proc=proc, sock=ours, directory=directory, key=key)


class StandbySlot:
    """The one fork server of a worker (or none)."""

    def __init__(self) -> None:
        self._spare: Standby | None = None

    @property
    def spare(self) -> Standby | None:
        return self._spare

    def fill(self, settings: Settings) -> None:
        """Start a fork server unless a usable one runs already (with `training_spare`; without, keep
        one that runs, as the next attempt will use it); never raises (the next attempt would then
        start one itself, or a fresh process)."""
        if self._spare is not None and self._spare.usable():
            return
        self.close()
        if not settings.training_spare:
            return
        self._start(settings)

    def _start(self, settings: Settings) -> None:
        try:
            self._spare = start_standby(settings)
        except Exception as exc:
            logger.warning("could not start a fork server for training processes: %s", exc)

    def take(
        self, settings: Settings, env: dict[str, str], *, job_id: str, attempt: int
    ) -> ForkedTraining | None:
        """Hand the attempt to the fork server (started now if there is none and `training_fork_server`
        is on) and return its training process; None when there is no usable fork server (the caller
        starts a fresh process). `env` is the environment a fresh training process for the attempt
        would get: a fork server started with another one (or older code) is discarded."""
        # Once per claim: `code_stamp` reads the modification time of every source file.
        key = environment_key(env)
        spare = self._spare
        if spare is not None and (not spare.usable() or spare.key != key):
            why = "its environment or code is stale" if spare.usable() else "it died or was used up"
            logger.info("not using fork server %d: %s", spare.proc.pid, why)
            self.close()
            spare = None
        if spare is None and (settings.training_spare or settings.training_fork_server):
            self._start(settings)
            spare = self._spare
            if spare is not None and spare.key != key:
                self.close()  # (its environment is the attempt's but for the log folder: never here)
                spare = None
        if spare is None:
            return None
        try:
            send_message(spare.sock, {"job_id": job_id, "attempt": attempt})
        except OSError as exc:
            logger.info("fork server %d did not take job %s: %s", spare.proc.pid, job_id, exc)
            self.close()
            return None
        return ForkedTraining(spare)

    def close(self) -> None:
        """Stop the fork server (its children with it) and remove its folder, if any."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()


# The worker's slot (the solo pool runs one training at a time in its main thread).
SLOT = StandbySlot()
