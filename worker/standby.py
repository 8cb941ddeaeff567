"""A spare training process per worker, started ahead of its job (a warm start).

Importing torch and super-gradients and setting up the device take seconds, most of a job's wait
between its claim and its first batch. Each worker keeps one spare training process that has done
all that with the environment a training process gets (`app.ml.sg_setup.child_environment`),
logging into a folder of its own under `STANDBY_DIR`, and then blocks reading its assignment (job
id and attempt) on its stdin. A claimed attempt is handed to it (`StandbySlot.take`); it moves its
output and super-gradients' log files into the job directory (`worker.train_process`) and trains as
a process started for the job would. It is still one process per attempt, which exits when the
attempt ends: nothing a training sets process-wide reaches the next job.

A spare that died, or was started with another environment or older code than a training process
would get now, is discarded and the attempt starts a fresh process, as without a spare. The next
spare is started when the worker starts and whenever a training ends, not while one runs: its
seconds of imports would take CPU from that training (seen on 2 cores). A job claimed while the
spare still imports is handed to it all the same: it starts as soon as the imports are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import app
import worker
from app.ml.sg_setup import child_environment
from app.process import die_with_parent
from app.settings import Settings

logger = logging.getLogger(__name__)

# Under the service's home: one folder per spare (its output and super-gradients' logs until it has
# a job), removed when the training it took ends or it is discarded.
STANDBY_DIR = "standby"
# Written into a spare's folder once it has imported everything and waits (the benchmark waits for it).
READY_FILE = "ready"
STANDBY_OUTPUT = "output.log"
STANDBY_SG_LOGS = "logs"
# The spare's last argument: room that it overwrites with its job id and attempt once it has them, so
# that `ps` (and whoever looks for a job's training process by its command line) sees them.
STANDBY_ARG = "--standby" + "=" * 96
STANDBY_COMMAND: list[str] = [sys.executable, "-m", "worker.train_process", STANDBY_ARG]
# The variable that differs between two training processes of the same worker by design.
_PER_PROCESS_VARIABLES = ("SUPER_GRADIENTS_LOG_DIR",)


def code_stamp() -> int:
    """The newest modification time of the service's Python sources (ns): a spare started before a
    deploy that changed them would run the old code."""
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


@dataclass
class Standby:
    """A spare training process: its process, its folder and what it was started with."""

    proc: subprocess.Popen[bytes]
    directory: Path
    key: str

    def discard(self) -> None:
        """Stop the process (if alive) and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _host() -> str:
    # Workers on other hosts (containers) may share the home: their pids mean nothing here.
    return socket.gethostname().replace("@", "_").replace("/", "_")


def _remove_orphans(root: Path) -> None:
    """Remove the folders of spares whose worker on this host is gone (killed: its spare got SIGTERM,
    its folder stayed). A folder's name is `HOST@PID-` of its worker and a random part."""
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
    """Start a spare training process for `settings`; it imports in the background."""
    root = settings.home / STANDBY_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root)
    directory = Path(tempfile.mkdtemp(prefix=f"{_host()}@{os.getpid()}-", dir=root))
    env = child_environment(directory / STANDBY_SG_LOGS, extra=settings.as_env())
    key = environment_key(env)
    try:
        with open(directory / STANDBY_OUTPUT, "ab") as output:
            proc = subprocess.Popen(
                STANDBY_COMMAND,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                env=env,
                cwd=directory,
                start_new_session=True,
                # Started by the worker's main thread (the solo pool's task thread), which lives as long
                # as the worker: the signal comes when the worker dies.
                preexec_fn=die_with_parent(),
            )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    logger.info("started a standby training process (pid %d)", proc.pid)
    return Standby(proc=proc, directory=directory, key=key)


class StandbySlot:
    """The one spare training process of a worker (or none)."""

    def __init__(self) -> None:
        self._spare: Standby | None = None

    @property
    def spare(self) -> Standby | None:
        return self._spare

    def fill(self, settings: Settings) -> None:
        """Start a spare unless a live one waits already; never raises (the next attempt would then
        start a fresh process)."""
        if not settings.training_spare:
            self.close()
            return
        if self._spare is not None and self._spare.proc.poll() is None:
            return
        self.close()
        try:
            self._spare = start_standby(settings)
        except Exception as exc:
            logger.warning("could not start a standby training process: %s", exc)

    def take(self, env: dict[str, str], *, job_id: str, attempt: int) -> Standby | None:
        """Hand the attempt to the spare and return it (the slot is empty then); None when there is
        no usable spare (none, dead, or started with another environment or code than `env`, the
        environment a fresh training process for the attempt would get)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.proc.poll() is not None or spare.key != environment_key(env):
            why = "it died" if spare.proc.poll() is not None else "its environment or code is stale"
            logger.info("not using standby training process %d: %s", spare.proc.pid, why)
            spare.discard()
            return None
        assignment = {"job_id": job_id, "attempt": attempt}
        try:
            assert spare.proc.stdin is not None
            spare.proc.stdin.write(json.dumps(assignment).encode() + b"\n")
            spare.proc.stdin.close()
        except OSError as exc:
            logger.info("standby training process %d did not take job %s: %s", spare.proc.pid, job_id, exc)
            spare.discard()
            return None
        return spare

    def close(self) -> None:
        """Stop and remove the spare, if any."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()


# The worker's slot (the solo pool runs one training at a time in its main thread).
SLOT = StandbySlot()
