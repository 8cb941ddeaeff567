"""The `sgjobs` command: serve, api, worker, migrate, keys, demo-dataset."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from app.process import die_with_parent
from app.queue import prepare_broker
from app.settings import Settings, get_settings

logger = logging.getLogger("sgjobs")


def _worker_argv() -> list[str]:
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
        settings.task_queue,
        "--hostname",
        # Unique per worker process (a restarted worker is a new one), so a job's attempts name
        # who ran them and a worker's presence row is its own.
        f"sgjobs@{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def cmd_migrate(_: argparse.Namespace) -> int:
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


def _listen_args(args: argparse.Namespace) -> Settings:
    """--host and --port become SGJOBS_HOST and SGJOBS_PORT, for this process and its children (the
    worker): every part then agrees on the API's address (the links in webhook messages)."""
    if args.host:
        os.environ["SGJOBS_HOST"] = args.host
    if args.port:
        os.environ["SGJOBS_PORT"] = str(args.port)
    get_settings.cache_clear()
    return get_settings()


def _bootstrap_webhook_secret(settings: Settings) -> None:
    from app.webhooks.signing import secret, secret_path

    if settings.webhook_secret is None:
        secret(settings)
        print(f"webhook signing key: {secret_path(settings)} (or set SGJOBS_WEBHOOK_SECRET)", flush=True)


def cmd_api(args: argparse.Namespace) -> int:
    from app.migrate import pending

    settings = _listen_args(args)
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


def cmd_worker(_: argparse.Namespace) -> int:
    settings = get_settings()
    settings.ensure_dirs()
    prepare_broker(settings)
    argv = _worker_argv()
    os.execv(argv[0], argv)
    return 0  # pragma: no cover  (execv does not return)


class WorkerKeeper:
    """Runs the worker as a child process and starts it again when it dies (with backoff), until
    `stop()`: a worker killed by the out-of-memory killer or a crash does not leave jobs waiting."""

    # A worker that ran this long before dying is restarted at once; a crash loop backs off.
    HEALTHY_SECONDS = 60.0
    MAX_BACKOFF_SECONDS = 30.0

    def __init__(self) -> None:
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
                _worker_argv(), start_new_session=True, preexec_fn=die_with_parent()
            )
            self._started = time.monotonic()
        print(f"worker started (pid {self.process.pid})", flush=True)

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


def cmd_serve(args: argparse.Namespace) -> int:
    """Migrate, keep one worker running as a child process and the API in this one; stop both together."""
    settings = _listen_args(args)
    cmd_migrate(args)
    _bootstrap_admin_key()
    _bootstrap_webhook_secret(settings)
    prepare_broker(settings)
    keeper = WorkerKeeper().start()
    print(f"datasets directory: {settings.datasets_dir}", flush=True)
    try:
        _run_api(settings.host, settings.port)
    finally:
        keeper.stop()
    return 0


def cmd_demo_dataset(args: argparse.Namespace) -> int:
    from app.datasets.demo import ShapesSpec, write_shapes_dataset

    settings = get_settings()
    target = settings.datasets_dir / args.name
    if target.exists():
        print(f"{target} already exists", file=sys.stderr)
        return 1
    write_shapes_dataset(
        target, ShapesSpec(splits=(("train", args.train), ("valid", args.valid)), seed=args.seed)
    )
    print(
        f'wrote a COCO shapes dataset to {target}; use "dataset": {{"format": "coco", "path": "{args.name}"}}'
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """`sgjobs keys create|list|revoke`: API keys, straight in the database (an operator's tool)."""
    from app.auth import service as auth
    from app.auth.models import Role
    from app.db import session_scope
    from app.errors import AppError
    from app.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            if args.keys_command == "create":
                role = Role.admin if args.admin else Role.member
                record, key = auth.create_key(session, tenant=args.tenant, role=role, name=args.name)
                print(f"created {role.value} key {record.id} for tenant {record.tenant!r}; shown only once:")
                # Alone on the last line, so scripts can take it with `tail -n 1`.
                print(key)
            elif args.keys_command == "list":
                keys = auth.list_keys(session, include_revoked=args.all)
                widths = {"id": 32, "prefix": 12, "tenant": 16, "role": 6, "created": 19, "last used": 19}

                def row(values: list[str]) -> str:
                    return "  ".join(f"{v:{w}}" for v, w in zip(values, widths.values(), strict=True))

                print(row(list(widths)) + "  name")
                for k in keys:
                    used = f"{k.last_used_at:%Y-%m-%d %H:%M:%S}" if k.last_used_at else "-"
                    created = f"{k.created_at:%Y-%m-%d %H:%M:%S}"
                    state = " (revoked)" if k.revoked_at else ""
                    print(row([k.id, k.prefix, k.tenant, k.role, created, used]) + f"  {k.name or ''}{state}")
            else:
                record = auth.revoke_key(session, key_id=args.key_id)
                print(f"revoked key {record.id} (tenant {record.tenant!r})")
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgjobs", description="Fine-tune YOLO-NAS detectors over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "migrate, then run the API and one worker"),
        ("api", "run the API only"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", default=None, help="default: SGJOBS_HOST or 127.0.0.1")
        p.add_argument("--port", type=int, default=None, help="default: SGJOBS_PORT or 8000")
    sub.add_parser("worker", help="run a training worker (one per GPU)")
    sub.add_parser("migrate", help="apply database migrations")
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once, alone on the last line)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--admin", action="store_true", help="an admin key: sees every tenant")
    create.add_argument("--name", default=None, help="a label for lists")
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", help="the key's id or prefix, as `keys list` shows them")
    demo = sub.add_parser(
        "demo-dataset", help="write a small generated COCO dataset into the datasets directory"
    )
    demo.add_argument("--name", default="shapes")
    demo.add_argument("--train", type=int, default=64)
    demo.add_argument("--valid", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    return parser


COMMANDS = {
    "serve": cmd_serve,
    "api": cmd_api,
    "worker": cmd_worker,
    "migrate": cmd_migrate,
    "keys": cmd_keys,
    "demo-dataset": cmd_demo_dataset,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
