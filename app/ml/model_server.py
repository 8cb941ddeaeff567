"""The inference process: one long-lived child of the API that holds the ready models.

The API process never imports torch or super-gradients (SG's import replaces stdout/stderr, calls
`logging.basicConfig(force=True)` and wraps the excepthook). It starts this module lazily as
`python -m app.ml.model_server FD CAPACITY DEVICE WINDOW_MS MAX_BATCH_IMAGES`, on the first /predict
or export, and talks to it over a Unix socket pair with `multiprocessing.connection` (pickled dicts).

The protocol is multiplexed: every request carries an `id` and its answer the same `id`, so many
calls are in flight at once. In the parent, callers send under a lock and wait on a future; one
reader thread per child routes each answer to its future. In the child, a receiver loop hands
predictions to decoding threads (the uploads arrive as sent, checked from their headers by the
API: `app.images`) and then to `app.ml.batcher` (one runner thread per model, requests for the same
model merged into batches), exports and inspections to a thread of their own (seconds each, never
in front of a prediction), and answers `stats` at once.

If the child dies, or a caller's answer does not come in time, the parent kills it, every waiting
call gets `ModelServerUnavailable` (the API's 503), and the next call starts a fresh one.

This module's top level is the parent side and imports only the standard library (and
`app.ml.sg_setup`, which does too).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from app.ml.sg_setup import child_environment, setup_device
from app.ml.types import DEFAULT_MAX_BATCH_IMAGES

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 120.0
LOST_MESSAGE = "the inference process stopped (see the inference log); try again"
# Threads decoding uploads: a few requests' photos at once, beside the models' runner threads.
DECODE_THREADS = 4


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
class _Child:
    """One started inference process and the calls waiting for its answers."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    conn: Connection
    pending: dict[int, Future[dict[str, Any]]] = field(default_factory=dict)
    # When the child last answered a prediction, export or inspection (`stats` answers say
    # nothing of the threads that do the work): a busy child makes progress, a hung one does not.
    progress: float = field(default_factory=time.monotonic)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False


@dataclass
class ModelServer:
    """Parent-side handle on the inference process. Thread-safe; any number of calls in flight."""

    log_file: Path
    sg_log_dir: Path
    capacity: int
    device: str = "cpu"
    batch_window_ms: float = 5.0
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    # Bytes the held models may take together (`InferenceEngine.max_bytes`); None: by count only.
    max_bytes: int | None = None
    starts: int = 0
    _child: _Child | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def _start(self) -> _Child:
        parent_sock, child_sock = socket.socketpair()
        # Only errors from SG on the console: the inference log is about requests, not SG's chatter.
        env = child_environment(self.sg_log_dir, console_level="ERROR")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.ml.model_server",
                    str(child_sock.fileno()),
                    str(self.capacity),
                    self.device,
                    str(self.batch_window_ms),
                    str(self.max_batch_images),
                    str(self.max_bytes or 0),
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
        # The reader owns (and closes) the Connection's descriptor; `sock` stays to shut the socket
        # down, which wakes a reader or sender blocked on it.
        child = _Child(proc=proc, sock=parent_sock, conn=Connection(os.dup(parent_sock.fileno())))
        self.starts += 1
        threading.Thread(target=self._read, args=(child,), name="model-server-reader", daemon=True).start()
        logger.info("inference process started (pid %s)", proc.pid)
        return child

    def _read(self, child: _Child) -> None:
        """Route every answer of `child` to its waiting call, until its socket ends."""
        try:
            while True:
                answer: dict[str, Any] = child.conn.recv()
                with self._lock:
                    future = child.pending.pop(answer.get("id", -1), None)
                    if not answer.get("stats"):
                        child.progress = time.monotonic()
                if future is not None and not future.done():
                    future.set_result(answer)
        except (EOFError, OSError):
            pass
        except Exception:  # an answer that does not unpickle: the stream cannot be trusted any more
            logger.exception("inference process %s sent an unreadable answer", child.proc.pid)
        finally:
            self._stop(child, LOST_MESSAGE)
            child.conn.close()

    def _stop(self, child: _Child, reason: str) -> None:
        """Kill `child` (once) and fail every call still waiting for it with `reason`."""
        with self._lock:
            if child.stopped:
                return
            child.stopped = True
            if self._child is child:
                self._child = None
            waiting, child.pending = child.pending, {}
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()
        try:
            child.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        child.sock.close()
        if waiting:
            logger.warning("inference process %s stopped with %d calls waiting", child.proc.pid, len(waiting))
        logger.warning("inference process %s stopped (exit %s)", child.proc.pid, child.proc.returncode)
        for future in waiting.values():
            if not future.done():
                future.set_exception(ModelServerUnavailable(reason))

    def submit(self, op: str, **payload: Any) -> tuple[Future[dict[str, Any]], float, _Child]:
        """Send one request; its future, the extra seconds to allow (a start-up) and the child."""
        extra = 0.0
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            child = self._child
            if child is None or child.proc.poll() is not None:
                if child is not None:
                    # Exited, but its reader has not noticed yet: fail its calls now.
                    threading.Thread(target=self._stop, args=(child, LOST_MESSAGE), daemon=True).start()
                child = self._child = self._start()
                extra = STARTUP_TIMEOUT_SECONDS
            request_id = next(self._ids)
            child.pending[request_id] = future
        try:
            with child.send_lock:
                child.conn.send({"id": request_id, "op": op, **payload})
        except (EOFError, OSError) as exc:
            # A partial message leaves the stream unusable: this child is done.
            self._stop(child, LOST_MESSAGE)
            raise ModelServerUnavailable(LOST_MESSAGE) from exc
        except Exception:  # the payload did not pickle: nothing was written
            with self._lock:
                child.pending.pop(request_id, None)
            raise
        return future, extra, child

    def call(self, op: str, *, timeout: float, **payload: Any) -> dict[str, Any]:
        """Send one request and wait for its answer while the child makes progress: it is taken as
        hung when `timeout` seconds (plus start-up) pass with neither this answer nor any other
        (requests queued behind others' batches wait for them; the child answers one after another).

        Raises ModelServerError for an error the child reported, ModelServerUnavailable when it
        died or hung (it is killed, failing every call in flight; the next call starts a new one).
        """
        future, extra, child = self.submit(op, **payload)
        limit = timeout + extra
        sent = time.monotonic()
        while True:
            since = max(sent, child.progress)
            try:
                answer = future.result(max(0.0, since + limit - time.monotonic()))
                break
            except FutureTimeout:
                if child.progress > since:
                    continue  # others were answered meanwhile: busy, not hung
                message = f"the inference process did not answer within {limit:.0f} s"
                self._stop(child, message)
                if not future.done():
                    raise ModelServerUnavailable(message) from None
                answer = future.result()  # the answer (or the failure) won the race
                break
        if not answer.get("ok"):
            raise ModelServerError(str(answer.get("kind", "internal")), str(answer.get("message", "")))
        result: dict[str, Any] = answer["result"]
        return result

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        child = self._child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def close(self) -> None:
        """Stop the child (at API shutdown)."""
        child = self._child
        if child is not None:
            self._stop(child, "the API is shutting down")


_server: ModelServer | None = None
_server_lock = threading.Lock()


def get_model_server(
    *,
    home: Path,
    capacity: int,
    device: str,
    batch_window_ms: float = 5.0,
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
    max_bytes: int | None = None,
) -> ModelServer:
    """The API process's one inference process handle (started lazily on its first call)."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ModelServer(
                log_file=home / "logs" / "inference.log",
                sg_log_dir=home / "logs" / "inference-sg",
                capacity=capacity,
                device=device,
                batch_window_ms=batch_window_ms,
                max_batch_images=max_batch_images,
                max_bytes=max_bytes,
            )
            atexit.register(_server.close)
        return _server


# --- the child side -----------------------------------------------------------------------------


def _error(exc: BaseException) -> dict[str, Any]:
    """The answer for a request that failed with `exc`."""
    from app.ml.export import ExportError
    from app.ml.inference import ModelLoadError
    from app.ml.types import ExportTooLarge
    from app.ml.weights import CheckpointRejected

    if isinstance(exc, CheckpointRejected | ExportTooLarge):
        return {"ok": False, "kind": "invalid", "message": str(exc)}
    if isinstance(exc, ModelLoadError):
        return {"ok": False, "kind": "load", "message": str(exc)}
    if isinstance(exc, ExportError):
        return {"ok": False, "kind": "export", "message": str(exc)}
    if isinstance(exc, FileNotFoundError):
        return {"ok": False, "kind": "load", "message": f"checkpoint not found: {exc.filename}"}
    # One bad request must not end the process holding every model.
    logging.getLogger(__name__).error("request failed", exc_info=exc)
    return {"ok": False, "kind": "internal", "message": f"{exc.__class__.__name__}: {exc}"}


class _Replies:
    """The child's end of the socket, shared by the threads that answer."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, request_id: Any, answer: dict[str, Any]) -> None:
        try:
            with self.lock:
                self.conn.send({"id": request_id, **answer})
        except (EOFError, OSError):
            os._exit(0)  # the API went away: nothing left to answer
        except Exception as exc:  # an answer that does not pickle still gets one
            with self.lock:
                self.conn.send({"id": request_id, **_error(exc)})


def _slow(engine: Any, request: dict[str, Any]) -> dict[str, Any]:
    """An export or an inspection (seconds; on the slow-ops thread)."""
    from dataclasses import asdict

    from app.ml.export import export_onnx
    from app.ml.weights import inspect_checkpoint

    if request["op"] == "export":
        engine.ensure_torch()
        result = export_onnx(
            request["model"],
            Path(request["checkpoint"]),
            Path(request["output"]),
            conf=request["conf"],
            iou=request["iou"],
            device=engine.device,
            class_names=request.get("class_names"),
            input_size=request.get("input_size"),
            batch_size=request.get("batch_size", 1),
            fp16=request.get("fp16", False),
            max_pixels=request.get("max_pixels"),
        )
        return {"ok": True, "result": asdict(result)}
    # Unpickling someone's file happens here, never in the API process (weights_only=True).
    return {"ok": True, "result": asdict(inspect_checkpoint(Path(request["path"])))}


def _slow_ops(engine: Any, requests: queue.Queue[dict[str, Any]], replies: _Replies) -> None:
    while True:
        request = requests.get()
        try:
            answer = _slow(engine, request)
        except Exception as exc:
            answer = _error(exc)
        replies.send(request.get("id"), answer)


def _predict(batcher: Any, request: dict[str, Any], replies: _Replies) -> None:
    """Decode the request's uploads (on a decoding thread: see `serve`), then queue it; its runner
    thread answers. A file that does not decode is answered here, naming it."""
    from dataclasses import asdict

    from app.errors import AppError
    from app.images import Upload, decode_image
    from app.ml.batcher import BatchAnswer, PredictRequest
    from app.ml.inference import ModelKey

    request_id = request.get("id")

    def done(answer: BatchAnswer | BaseException) -> None:
        if isinstance(answer, BaseException):
            replies.send(request_id, _error(answer))
        else:
            replies.send(request_id, {"ok": True, "result": asdict(answer)})

    try:
        max_pixels = int(request["max_pixels"])
        uploads = [Upload(name, data) for name, data in request["uploads"]]
        images = [decode_image(upload, max_pixels=max_pixels) for upload in uploads]
        key = ModelKey.of(request["model"], Path(request["checkpoint"]), request.get("class_names"))
    except AppError as exc:  # a truncated or corrupt file: the sender's to fix
        replies.send(request_id, {"ok": False, "kind": "invalid", "message": exc.message})
        return
    except Exception as exc:
        replies.send(request_id, _error(exc))
        return
    batcher.submit(
        PredictRequest(
            key=key,
            images=images,
            conf=float(request["conf"]),
            iou=float(request["iou"]),
            image_format=request.get("image_format"),
            done=done,
        )
    )


def _preload(engine: Any, batcher: Any, request: dict[str, Any], replies: _Replies) -> None:
    """Load a model into the cache ahead of its first prediction (`app.prediction.warm`)."""
    from app.ml.inference import ModelKey

    try:
        key = ModelKey.of(request["model"], Path(request["checkpoint"]), request.get("class_names"))
        with batcher.load_lock:
            loaded, cached = engine.get(key)
        answer = {"ok": True, "result": {"backend": loaded.backend, "cached": cached}}
    except Exception as exc:
        answer = _error(exc)
    replies.send(request.get("id"), answer)


def _stats(engine: Any, batcher: Any) -> dict[str, Any]:
    from dataclasses import asdict

    with batcher.load_lock:  # the engine's LRU changes while a model loads
        engine_stats = engine.stats()
    return {
        **engine_stats,
        **asdict(batcher.stats),
        "running_models": batcher.running_models(),
        "pid": os.getpid(),
    }


def _answer_stats(engine: Any, batcher: Any, request_id: Any, replies: _Replies) -> None:
    try:
        answer = {"ok": True, "result": _stats(engine, batcher)}
    except Exception as exc:
        answer = _error(exc)
    replies.send(request_id, {**answer, "stats": True})  # not progress of the work (see `_Child`)


def serve(conn: Connection, engine: Any, *, window: float, max_batch_images: int) -> int:
    """Answer requests from `conn` until the API goes away (the receiver loop)."""
    from app.ml.batcher import Batcher

    replies = _Replies(conn)
    batcher = Batcher(engine, window=window, max_images=max_batch_images)
    decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode")
    slow: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_slow_ops, args=(engine, slow, replies), name="slow-ops", daemon=True).start()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return 0  # the API went away (or killed us mid-request): nothing left to answer
        op = request.get("op")
        try:
            if op == "predict":
                # Decoding takes ms (a photo: tens of ms): never in this loop, which receives every
                # request; several at once, as PIL's decoders let go of the GIL.
                decoders.submit(_predict, batcher, request, replies)
            elif op in ("export", "inspect"):
                slow.put(request)
            elif op == "preload":
                # Loading takes a while: on a thread, like a runner's load.
                threading.Thread(
                    target=_preload, args=(engine, batcher, request, replies), name="preload", daemon=True
                ).start()
            elif op == "stats":
                # Waits for a model being loaded (its lock): on a thread, never in this loop.
                threading.Thread(
                    target=_answer_stats, args=(engine, batcher, request.get("id"), replies), daemon=True
                ).start()
            else:
                replies.send(
                    request.get("id"), {"ok": False, "kind": "internal", "message": f"unknown op {op!r}"}
                )
        except Exception as exc:
            replies.send(request.get("id"), _error(exc))


def main(argv: list[str]) -> int:
    """Child entry point:
    `python -m app.ml.model_server FD CAPACITY DEVICE [WINDOW_MS MAX_BATCH_IMAGES [MAX_BYTES]]`."""
    fd, capacity, requested_device = int(argv[0]), int(argv[1]), argv[2]
    window_ms = float(argv[3]) if len(argv) > 3 else 5.0
    max_batch_images = int(argv[4]) if len(argv) > 4 else DEFAULT_MAX_BATCH_IMAGES
    max_bytes = (int(argv[5]) or None) if len(argv) > 5 else None
    # The parent kills us when it needs to; SIGINT from a terminal's Ctrl-C is the API's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    start = time.perf_counter()
    from app.ml.inference import InferenceEngine

    if requested_device == "cpu":
        # torch and super-gradients (seconds to import) only with the first model onnxruntime cannot
        # serve: a process serving exported models starts in well under a second.
        device = "cpu"
        prepare_torch = functools.partial(setup_device, "cpu")
    else:
        try:
            device = setup_device(requested_device)
        except ValueError as exc:
            # A configuration error, not a crash: stay up and say so to every request, rather than
            # die and be restarted (seconds of imports) for each one.
            print(f"inference process {os.getpid()} cannot serve: {exc}", flush=True)
            return _refuse_all(conn, str(exc))
        prepare_torch = None
    engine = InferenceEngine(
        capacity=capacity,
        device=device,
        max_bytes=max_bytes,
        prepare_torch=prepare_torch,
        max_batch_images=max_batch_images,
    )
    print(
        f"inference process {os.getpid()} ready on {device} in {time.perf_counter() - start:.1f} s "
        f"(batches: {window_ms:g} ms window, up to {max_batch_images} images)",
        flush=True,
    )
    code = serve(conn, engine, window=window_ms / 1000, max_batch_images=max_batch_images)
    sys.stdout.flush()
    # Runner threads may be inside torch: leave without finalizing the interpreter under them.
    os._exit(code)


def _refuse_all(conn: Connection, message: str) -> int:
    """Answer every request with a `device` error until the API goes away."""
    while True:
        try:
            request = conn.recv()
            conn.send({"id": request.get("id"), "ok": False, "kind": "device", "message": message})
        except (EOFError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
