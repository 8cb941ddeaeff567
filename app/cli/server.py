"""The server side of `sgjobs`: serve, api, worker, migrate, keys, demo-dataset (they run where the
service runs, with its settings and database)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated

import typer

from app.process import die_with_parent
from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

logger = logging.getLogger("sgjobs")


def _worker_argv() -> list[str]:
    from app.queue import worker_queues

    settings = get_settings()
    # The solo pool runs the task in the worker's main thread: the task only supervises a training
    # child process, and one training at a time per worker (one worker per GPU) is the design.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--queues",
        ",".join(worker_queues(settings)),
        "--hostname",
        # Unique per worker process (a restarted worker is a new one), so a job's attempts name
        # who ran them and a worker's presence row is its own.
        f"sgjobs@{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def cmd_migrate() -> int:
    from app.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    print(f"database at head: {_redact(settings.database_url)}")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _run_api(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level=get_settings().log_level)


def _bootstrap_admin_key() -> None:
    from app.auth.service import bootstrap_admin_key

    path = bootstrap_admin_key(get_settings())
    if path is not None:
        print(f"admin API key: {path} (send it as `Authorization: Bearer $(cat {path})`)", flush=True)


def _listen_args(host: str | None, port: int | None) -> Settings:
    """--host and --port become SGJOBS_HOST and SGJOBS_PORT, for this process and its children (the
    worker): every part then agrees on the API's address (the links in webhook messages)."""
    if host:
        os.environ["SGJOBS_HOST"] = host
    if port:
        os.environ["SGJOBS_PORT"] = str(port)
    get_settings.cache_clear()
    return get_settings()


def _bootstrap_webhook_secret(settings: Settings) -> None:
    from app.webhooks.signing import secret, secret_path

    if settings.webhook_secret is None:
        secret(settings)
        print(f"webhook signing key: {secret_path(settings)} (or set SGJOBS_WEBHOOK_SECRET)", flush=True)


def cmd_api(host: str | None, port: int | None) -> int:
    from app.migrate import pending

    settings = _listen_args(host, port)
    settings.ensure_dirs()
    # `api` leaves migrating to `sgjobs migrate` (run once per deployment, before the API processes);
    # on an old schema every request would fail, so refuse to start and say what to run.
    behind = pending(settings.database_url)
    if behind is not None:
        print(f"sgjobs api: {_redact(settings.database_url)}: {behind}", file=sys.stderr)
        return 2
    _bootstrap_admin_key()
    _bootstrap_webhook_secret(settings)
    _run_api(settings.host, settings.port)
    return 0


def _pool_args(queue: str | None, gpus: str | None, gpus_per_slot: int | None = None) -> Settings:
    """--queue, --gpus and --gpus-per-slot become SGJOBS_WORKER_QUEUE, SGJOBS_WORKER_GPUS and
    SGJOBS_WORKER_GPUS_PER_SLOT, for this process and its children (the worker processes), and are
    checked as the settings check them."""
    if queue is not None:
        os.environ["SGJOBS_WORKER_QUEUE"] = queue
    if gpus is not None:
        os.environ["SGJOBS_WORKER_GPUS"] = gpus
    if gpus_per_slot is not None:
        os.environ["SGJOBS_WORKER_GPUS_PER_SLOT"] = str(gpus_per_slot)
    get_settings.cache_clear()
    return get_settings()


def cmd_worker(queue: str | None = None, gpus: str | None = None, gpus_per_slot: int | None = None) -> int:
    """One Celery worker in this process (exec), or, with GPUs listed, one kept-alive worker
    process per slot of `worker_gpus_per_slot` GPUs, each seeing only its own
    (`CUDA_VISIBLE_DEVICES`), stopped together."""
    from pydantic import ValidationError

    from app.queue import prepare_broker

    try:
        settings = _pool_args(queue, gpus, gpus_per_slot)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"sgjobs worker: {problems}", file=sys.stderr)
        return 2
    settings.ensure_dirs()
    prepare_broker(settings)
    slots = settings.worker_slots
    if not slots:
        argv = _worker_argv()
        os.execv(argv[0], argv)
    return run_worker_slots(slots)


def run_worker_slots(slots: list[list[str]]) -> int:
    """Keep one worker process per slot (its GPU ids) until SIGTERM or SIGINT, then stop them all
    together (each hands its running job back, see `WorkerKeeper.stop`)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    keepers = [gpu_keeper(slot).start() for slot in slots]
    while not stop.wait(1.0):
        pass
    stop_all(keepers)
    return 0


def gpu_keeper(slot: list[str]) -> WorkerKeeper:
    """A keeper of one worker process that sees only the GPUs of `slot`."""
    label = f"GPU{'s' if len(slot) > 1 else ''} {','.join(slot)}"
    return WorkerKeeper(env={"CUDA_VISIBLE_DEVICES": ",".join(slot)}, label=label)


def stop_all(keepers: list[WorkerKeeper], timeout: float = 20.0) -> None:
    """`stop` every keeper at once: stopped one after the other, the last would wait for all the
    others' grace periods before handing its job back."""
    threads = [threading.Thread(target=k.stop, args=(timeout,), daemon=True) for k in keepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class WorkerKeeper:
    """Runs the worker as a child process and starts it again when it dies (with backoff), until
    `stop()`: a worker killed by the out-of-memory killer or a crash does not leave jobs waiting.
    `env` is added to this process's environment for the child (`CUDA_VISIBLE_DEVICES` of its GPU)."""

    # A worker that ran this long before dying is restarted at once; a crash loop backs off.
    HEALTHY_SECONDS = 60.0
    MAX_BACKOFF_SECONDS = 30.0

    def __init__(self, env: Mapping[str, str] | None = None, label: str = "") -> None:
        self._env = {**os.environ, **env} if env else None
        self._label = label
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._thread = threading.Thread(target=self._keep, name="sgjobs-worker-keeper", daemon=True)

    def start(self) -> WorkerKeeper:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.process = subprocess.Popen(
                _worker_argv(), env=self._env, start_new_session=True, preexec_fn=die_with_parent()
            )
            self._started = time.monotonic()
        on = f", {self._label}" if self._label else ""
        print(f"worker started (pid {self.process.pid}{on})", flush=True)

    def _keep(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            proc = self.process
            if proc is None or proc.poll() is None:
                self._stopping.wait(0.5)
                continue
            if time.monotonic() - self._started > self.HEALTHY_SECONDS:
                backoff = 1.0
            logger.warning("the worker exited with %s; starting it again in %.0f s", proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(2 * backoff, self.MAX_BACKOFF_SECONDS)
            self.restarts += 1
            self._spawn()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: the worker hands its running job back (another worker, or this service's next
        start, resumes it from its last checkpoint), then exits; SIGKILL after `timeout`."""
        with self._lock:
            self._stopping.set()
            proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cmd_serve(host: str | None, port: int | None) -> int:
    """Migrate, keep one worker running as a child process and the API in this one; stop both together."""
    from app.queue import prepare_broker

    settings = _listen_args(host, port)
    cmd_migrate()
    _bootstrap_admin_key()
    _bootstrap_webhook_secret(settings)
    prepare_broker(settings)
    # One worker, or one per GPU of SGJOBS_WORKER_GPUS, as `sgjobs worker` runs them.
    keepers = [gpu_keeper(slot).start() for slot in settings.worker_slots] or [WorkerKeeper().start()]
    print(f"datasets directory: {settings.datasets_dir}", flush=True)
    try:
        _run_api(settings.host, settings.port)
    finally:
        stop_all(keepers)
    return 0


def cmd_demo_dataset(name: str, train: int, valid: int, seed: int) -> int:
    from app.datasets.demo import ShapesSpec, write_shapes_dataset

    settings = get_settings()
    target = settings.datasets_dir / name
    if target.exists():
        print(f"{target} already exists", file=sys.stderr)
        return 1
    write_shapes_dataset(target, ShapesSpec(splits=(("train", train), ("valid", valid)), seed=seed))
    print(f'wrote a COCO shapes dataset to {target}; use "dataset": {{"format": "coco", "path": "{name}"}}')
    return 0


def _keys(action: Callable[[Session], None]) -> int:
    """Run one `keys` action straight in the database (an operator's tool); 2 for refused input."""
    from app.db import session_scope
    from app.errors import AppError
    from app.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            action(session)
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def cmd_keys_create(tenant: str, admin: bool, name: str | None) -> int:
    from app.auth import service as auth
    from app.auth.models import Role

    def create(session: Session) -> None:
        role = Role.admin if admin else Role.member
        record, key = auth.create_key(session, tenant=tenant, role=role, name=name)
        print(f"created {role.value} key {record.id} for tenant {record.tenant!r}; shown only once:")
        # Alone on the last line, so scripts can take it with `tail -n 1`.
        print(key)

    return _keys(create)


def cmd_keys_list(include_revoked: bool) -> int:
    from app.auth import service as auth

    def listing(session: Session) -> None:
        keys = auth.list_keys(session, include_revoked=include_revoked)
        widths = {"id": 32, "prefix": 12, "tenant": 16, "role": 6, "created": 19, "last used": 19}

        def row(values: list[str]) -> str:
            return "  ".join(f"{v:{w}}" for v, w in zip(values, widths.values(), strict=True))

        print(row(list(widths)) + "  name")
        for k in keys:
            used = f"{k.last_used_at:%Y-%m-%d %H:%M:%S}" if k.last_used_at else "-"
            created = f"{k.created_at:%Y-%m-%d %H:%M:%S}"
            state = " (revoked)" if k.revoked_at else ""
            print(row([k.id, k.prefix, k.tenant, k.role, created, used]) + f"  {k.name or ''}{state}")

    return _keys(listing)


def cmd_keys_revoke(key_id: str) -> int:
    from app.auth import service as auth

    def revoke(session: Session) -> None:
        record = auth.revoke_key(session, key_id=key_id)
        print(f"revoked key {record.id} (tenant {record.tenant!r})")

    return _keys(revoke)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _done(code: int) -> None:
    if code:
        raise typer.Exit(code)


Host = Annotated[str | None, typer.Option(help="default: SGJOBS_HOST or 127.0.0.1")]
Port = Annotated[int | None, typer.Option(help="default: SGJOBS_PORT or 8000")]

keys = typer.Typer(help="API keys: create, list, revoke", no_args_is_help=True)


@keys.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for")],
    admin: Annotated[bool, typer.Option("--admin", help="an admin key: sees every tenant")] = False,
    name: Annotated[str | None, typer.Option(help="a label for lists")] = None,
) -> None:
    """Create a key (printed once, alone on the last line)."""
    _logging()
    _done(cmd_keys_create(tenant, admin, name))


@keys.command("list")
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
) -> None:
    """List keys (never the keys themselves)."""
    _logging()
    _done(cmd_keys_list(all_))


@keys.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id or prefix, as `keys list` shows them")],
) -> None:
    """Revoke a key at once."""
    _logging()
    _done(cmd_keys_revoke(key_id))


def register(cli: typer.Typer) -> None:
    """Add the server commands to the `sgjobs` command."""
    panel = "Server (run where the service runs)"

    @cli.command("serve", rich_help_panel=panel)
    def serve(host: Host = None, port: Port = None) -> None:
        """Migrate, then run the API and one worker (one per GPU of SGJOBS_WORKER_GPUS)."""
        _logging()
        _done(cmd_serve(host, port))

    @cli.command("api", rich_help_panel=panel)
    def api(host: Host = None, port: Port = None) -> None:
        """Run the API only."""
        _logging()
        _done(cmd_api(host, port))

    @cli.command("worker", rich_help_panel=panel)
    def worker(
        queue: Annotated[
            str | None,
            typer.Option(
                help='the worker pool to serve (jobs whose spec has "queue": NAME); '
                "default: SGJOBS_WORKER_QUEUE, else the default pool"
            ),
        ] = None,
        gpus: Annotated[
            str | None,
            typer.Option(
                help="GPU ids, 0,1,...: one worker process (training slot) per GPU, each "
                "with CUDA_VISIBLE_DEVICES=<id>; default: SGJOBS_WORKER_GPUS, else one worker"
            ),
        ] = None,
        gpus_per_slot: Annotated[
            int | None,
            typer.Option(
                help="GPUs per training slot: --gpus 0,1,2,3 --gpus-per-slot 2 runs two workers, on "
                "GPUs 0,1 and 2,3, each training jobs of up to 2 gpus data-parallel; without --gpus, "
                "what the one worker offers. Default: SGJOBS_WORKER_GPUS_PER_SLOT, else 1"
            ),
        ] = None,
    ) -> None:
        """Run a training worker (one per GPU, or one per GPU listed in --gpus)."""
        _logging()
        _done(cmd_worker(queue, gpus, gpus_per_slot))

    @cli.command("migrate", rich_help_panel=panel)
    def migrate() -> None:
        """Apply database migrations."""
        _logging()
        _done(cmd_migrate())

    cli.add_typer(keys, name="keys", rich_help_panel=panel)

    @cli.command("demo-dataset", rich_help_panel=panel)
    def demo_dataset(name: str = "shapes", train: int = 64, valid: int = 16, seed: int = 0) -> None:
        """Write a small generated COCO dataset into the datasets directory."""
        _logging()
        _done(cmd_demo_dataset(name, train, valid, seed))
