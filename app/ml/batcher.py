"""Prediction requests of the inference process, merged into batches per model.

Runs inside the inference process (`app.ml.model_server`). Each model (a `ModelKey`) with requests
waiting has one runner thread: it takes the oldest request, waits up to `window` seconds for more
requests to the same model with the same thresholds and output format, and runs them through the
model as one batch of at most `max_images` images (a request with more runs alone, never split).
The window is waited only while the model is busy (a request came while a batch of it ran, or
several wait together): a request to an idle model runs at once, where a lone client would
otherwise pay the whole window on every request. Requests that arrive while it runs make the next
batch. A runner stays `linger` seconds after its last batch for the model's next request: a client
sending one request after another finds it waiting, instead of paying a thread start each time.
Each request gets exactly its own images' results, in its order. Requests for different models run
on different threads, so one model's long batch never holds up another's; loading (`engine.get`,
not thread-safe) is serialized by one lock.

The engine: `get(key) -> (LoadedModel, cached)` and `infer(loaded, images, *, conf, iou,
image_format) -> (results, seconds)`, safe from different threads for different models (see
`_infer` for engines without `infer`). This module imports only the standard library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PredictRequest:
    """One request's images and settings, and where its answer goes (`done` gets a `BatchAnswer` or
    the exception that failed its batch; called once, from a runner thread)."""

    key: Hashable
    images: list[Any]
    conf: float
    iou: float
    image_format: str | None
    done: Callable[[BatchAnswer | BaseException], None]
    # Set by the batcher: it came while its model ran a batch (the model is busy).
    behind_batch: bool = field(default=False, init=False)

    def joins(self, first: PredictRequest) -> bool:
        """Whether this request can share `first`'s forward pass."""
        return (self.key, self.conf, self.iou, self.image_format) == (
            first.key,
            first.conf,
            first.iou,
            first.image_format,
        )


@dataclass
class BatchAnswer:
    """One request's share of a batch: its own results in order, and what the batch was."""

    results: list[Any]
    class_names: list[str]
    cached: bool
    model_loads: int
    seconds: float
    backend: str
    batch_requests: int
    batch_images: int


@dataclass
class BatchStats:
    """Counters since the process started."""

    requests: int = 0
    batches: int = 0
    merged_requests: int = 0  # requests that shared their forward pass with at least one other
    largest_batch: int = 0  # requests in the largest batch


def _infer(
    engine: Any, loaded: Any, images: list[Any], *, conf: float, iou: float, image_format: str | None
) -> tuple[list[Any], float]:
    """`engine.infer`, or for an engine without it (app.ml.inference before its `infer`) the same
    steps with that module's functions, which touch only `loaded`'s own pipeline."""
    infer = getattr(engine, "infer", None)
    if infer is not None:
        results, seconds = infer(loaded, images, conf=conf, iou=iou, image_format=image_format)
        return list(results), float(seconds)
    from app.ml.inference import run_pipeline, set_thresholds, to_result

    start = time.perf_counter()
    set_thresholds(loaded.pipeline, conf=conf, iou=iou)
    predictions = run_pipeline(loaded.pipeline, images)
    results = [to_result(p, loaded.class_names, image_format=image_format) for p in predictions]
    return results, time.perf_counter() - start


@dataclass
class Batcher:
    """Queues of prediction requests per model, each drained by its own runner thread."""

    engine: Any
    window: float
    max_images: int
    linger: float = 5.0
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    stats: BatchStats = field(default_factory=BatchStats)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _queues: dict[Hashable, deque[PredictRequest]] = field(default_factory=dict)
    _serving: set[Hashable] = field(default_factory=set)  # models taking or running a batch now

    def submit(self, request: PredictRequest) -> None:
        """Queue `request`; its model's runner thread starts if none runs."""
        with self._cond:
            self.stats.requests += 1
            queue = self._queues.get(request.key)
            if queue is None:
                queue = self._queues[request.key] = deque()
                threading.Thread(
                    target=self._run, args=(request.key,), name="predict-runner", daemon=True
                ).start()
            request.behind_batch = request.key in self._serving
            queue.append(request)
            self._cond.notify_all()

    def running_models(self) -> int:
        """Models with requests queued or a batch running now (not runners lingering idle)."""
        with self._cond:
            return sum(1 for key, queue in self._queues.items() if queue or key in self._serving)

    def runners(self) -> int:
        """Runner threads alive now, lingering ones included."""
        with self._cond:
            return len(self._queues)

    def _run(self, key: Hashable) -> None:
        while True:
            batch = self._take(key)
            if not batch:
                return
            self._serve(batch)

    def _take(self, key: Hashable) -> list[PredictRequest]:
        """The next batch for `key`: the oldest request and the compatible ones that come within the
        window (when the model is busy: see the module docstring), up to `max_images`. Empty (and
        the runner ends) when nothing came for `linger` seconds."""
        with self._cond:
            queue = self._queues[key]
            idle_until = time.monotonic() + self.linger
            while not queue:
                left = idle_until - time.monotonic()
                if left <= 0:
                    del self._queues[key]
                    return []
                self._cond.wait(left)
            first = queue.popleft()
            self._serving.add(key)
            batch, images = [first], len(first.images)
            busy = first.behind_batch or bool(queue)
            deadline = time.monotonic() + (self.window if busy else 0.0)
            while images < self.max_images:
                for request in list(queue):
                    if request.joins(first) and images + len(request.images) <= self.max_images:
                        queue.remove(request)
                        batch.append(request)
                        images += len(request.images)
                left = deadline - time.monotonic()
                if left <= 0 or images >= self.max_images:
                    break
                self._cond.wait(left)
            self.stats.batches += 1
            if len(batch) > 1:
                self.stats.merged_requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            return batch

    def _serve(self, batch: list[PredictRequest]) -> None:
        key = batch[0].key  # marked serving by `_take`
        try:
            answers = self._answers(batch)
        finally:
            # Before the answers go out: a client's next request finds its model idle, not busy.
            with self._cond:
                self._serving.discard(key)
        for request, answer in zip(batch, answers, strict=True):
            _deliver(request, answer)

    def _answers(self, batch: list[PredictRequest]) -> list[BatchAnswer | BaseException]:
        """One forward pass for `batch`: each request's share, or the exception that failed it."""
        first = batch[0]
        images = [image for request in batch for image in request.images]
        try:
            with self.load_lock:
                loaded, cached = self.engine.get(first.key)
                loads = int(getattr(self.engine, "loads", 0))
            results, seconds = _infer(
                self.engine, loaded, images, conf=first.conf, iou=first.iou, image_format=first.image_format
            )
            if len(results) != len(images):
                raise RuntimeError(f"{len(results)} results for {len(images)} images")
        except Exception as exc:  # every waiter hears of it; the runner goes on with the next batch
            return [exc for _ in batch]
        answers: list[BatchAnswer | BaseException] = []
        start = 0
        for request in batch:
            end = start + len(request.images)
            answers.append(
                BatchAnswer(
                    results=results[start:end],
                    class_names=list(loaded.class_names),
                    cached=cached,
                    model_loads=loads,
                    seconds=seconds,
                    backend=str(getattr(loaded, "backend", "pytorch")),
                    batch_requests=len(batch),
                    batch_images=len(images),
                )
            )
            start = end
        return answers


def _deliver(request: PredictRequest, answer: BatchAnswer | BaseException) -> None:
    try:
        request.done(answer)
    except Exception:  # a waiter that cannot be answered must not stop the runner for the others
        logger.exception("answering a prediction failed")
