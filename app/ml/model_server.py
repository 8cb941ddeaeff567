"""The inference process: one long-lived child of the API that holds the ready models.

The API process never imports torch or super-gradients (SG's import replaces stdout/stderr, calls
`logging.basicConfig(force=True)` and wraps the excepthook). It starts this module lazily as
`python -m app.ml.model_server FD`, on the first /predict or export, and talks to it over a Unix
socket pair with `multiprocessing.connection` (pickled dicts). The child answers one request at a
time; the parent serializes calls with a lock and waits off the event loop (in a worker thread).

If the child dies or stops answering, the parent kills it, answers that request with
`ModelServerUnavailable` (the API's 503) and starts a fresh one on the next request.

This module's top level is the parent side and imports only the standard library (and
`app.ml.sg_setup`, which does too).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from app.ml.sg_setup import child_environment, setup_device

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 120.0


class ModelServerError(Exception):
    """The inference process answered with an error. `kind`: load | export | device | invalid | internal.

    `device`: the configured device cannot be used (e.g. "cuda" without CUDA); every request gets it.
    `invalid`: a weights file sent for inspection is not a usable YOLO-NAS checkpoint.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class ModelServerUnavailable(Exception):
    """The inference process died or timed out; it is restarted on the next call."""


@dataclass
class ModelServer:
    """Parent-side handle on the inference process. Thread-safe; one call in flight at a time."""

    log_file: Path
    sg_log_dir: Path
    capacity: int
    device: str = "cpu"
    starts: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _conn: Connection | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        # Only errors from SG on the console: the inference log is about requests, not SG's chatter.
        env = child_environment(self.sg_log_dir, console_level="ERROR")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.ml.model_server",
                    str(child_sock.fileno()),
                    str(self.capacity),
                    self.device,
                ],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # No PR_SET_PDEATHSIG here: it fires when the *thread* that forked exits, and this
                # runs in a pool thread that exits when idle. The child instead exits when its end
                # of the socket reports EOF, which the kernel guarantees once this process is gone.
            )
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self.starts += 1
        logger.info("inference process started (pid %s)", self._proc.pid)

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            logger.warning("inference process %s stopped (exit %s)", self._proc.pid, self._proc.returncode)
            self._proc = None

    def call(self, op: str, *, timeout: float, **payload: Any) -> dict[str, Any]:
        """Send one request and wait up to `timeout` seconds (plus start-up) for its answer.

        Raises ModelServerError for an error the child reported, ModelServerUnavailable when it
        died or timed out (it is killed; the next call starts a new one).
        """
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
                timeout += STARTUP_TIMEOUT_SECONDS
            assert self._conn is not None
            try:
                self._conn.send({"op": op, **payload})
                if not self._conn.poll(timeout):
                    self._kill()
                    raise ModelServerUnavailable(
                        f"the inference process did not answer within {timeout:.0f} s"
                    )
                answer: dict[str, Any] = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._kill()
                raise ModelServerUnavailable(
                    "the inference process stopped (see the inference log); try again"
                ) from exc
        if not answer.get("ok"):
            raise ModelServerError(str(answer.get("kind", "internal")), str(answer.get("message", "")))
        result: dict[str, Any] = answer["result"]
        return result

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self) -> None:
        """Stop the child (at API shutdown)."""
        with self._lock:
            self._kill()


_server: ModelServer | None = None
_server_lock = threading.Lock()


def get_model_server(*, home: Path, capacity: int, device: str) -> ModelServer:
    """The API process's one inference process handle (started lazily on its first call)."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ModelServer(
                log_file=home / "logs" / "inference.log",
                sg_log_dir=home / "logs" / "inference-sg",
                capacity=capacity,
                device=device,
            )
            atexit.register(_server.close)
        return _server


# --- the child side -----------------------------------------------------------------------------


def _handle(engine: Any, request: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    from app.ml.export import ExportError, export_onnx
    from app.ml.inference import ModelKey, ModelLoadError
    from app.ml.weights import CheckpointRejected, inspect_checkpoint

    op = request["op"]
    try:
        if op == "predict":
            key = ModelKey.of(request["model"], Path(request["checkpoint"]), request.get("class_names"))
            outcome = engine.predict(
                key,
                request["images"],
                conf=request["conf"],
                iou=request["iou"],
                image_format=request.get("image_format"),
            )
            return {"ok": True, "result": asdict(outcome)}
        if op == "export":
            result = export_onnx(
                request["model"],
                Path(request["checkpoint"]),
                Path(request["output"]),
                conf=request["conf"],
                iou=request["iou"],
                device=engine.device,
                class_names=request.get("class_names"),
            )
            return {"ok": True, "result": asdict(result)}
        if op == "inspect":
            # Unpickling someone's file happens here, never in the API process (weights_only=True).
            return {"ok": True, "result": asdict(inspect_checkpoint(Path(request["path"])))}
        if op == "stats":
            return {"ok": True, "result": {**engine.stats(), "pid": os.getpid()}}
        return {"ok": False, "kind": "internal", "message": f"unknown op {op!r}"}
    except CheckpointRejected as exc:
        return {"ok": False, "kind": "invalid", "message": str(exc)}
    except ModelLoadError as exc:
        return {"ok": False, "kind": "load", "message": str(exc)}
    except ExportError as exc:
        return {"ok": False, "kind": "export", "message": str(exc)}
    except FileNotFoundError as exc:
        return {"ok": False, "kind": "load", "message": f"checkpoint not found: {exc.filename}"}
    except Exception as exc:  # one bad request must not end the process holding every model
        logging.getLogger(__name__).exception("request %s failed", op)
        return {"ok": False, "kind": "internal", "message": f"{exc.__class__.__name__}: {exc}"}


def main(argv: list[str]) -> int:
    """Child entry point: `python -m app.ml.model_server FD CAPACITY DEVICE`."""
    fd, capacity, requested_device = int(argv[0]), int(argv[1]), argv[2]
    # The parent kills us when it needs to; SIGINT from a terminal's Ctrl-C is the API's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    start = time.perf_counter()
    from app.ml.inference import InferenceEngine

    try:
        device = setup_device(requested_device)
    except ValueError as exc:
        # A configuration error, not a crash: stay up and say so to every request, rather than
        # die and be restarted (seconds of imports) for each one.
        print(f"inference process {os.getpid()} cannot serve: {exc}", flush=True)
        return _refuse_all(conn, str(exc))
    engine = InferenceEngine(capacity=capacity, device=device)
    print(
        f"inference process {os.getpid()} ready on {device} in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    while True:
        try:
            request = conn.recv()
            conn.send(_handle(engine, request))
        except (EOFError, OSError):
            return 0  # the API went away (or killed us mid-request): nothing left to answer


def _refuse_all(conn: Connection, message: str) -> int:
    """Answer every request with a `device` error until the API goes away."""
    while True:
        try:
            conn.recv()
            conn.send({"ok": False, "kind": "device", "message": message})
        except (EOFError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
