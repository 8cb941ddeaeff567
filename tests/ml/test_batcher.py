"""The batcher's scheduling with a fast fake engine (the real path: tests/prediction/test_concurrency.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.ml.batcher import BatchAnswer, Batcher, PredictRequest


@dataclass
class Loaded:
    key: str
    class_names: list[str]


@dataclass
class FakeEngine:
    """Answers each image `x` with `(key, x, conf)`; `gates[key]` holds that model's inference."""

    loads: int = 0
    calls: list[tuple[str, list[Any]]] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    entered: threading.Event = field(default_factory=threading.Event)
    threads: list[int] = field(default_factory=list)  # the thread of each inference
    _held: set[str] = field(default_factory=set)

    def get(self, key: str) -> tuple[Loaded, bool]:
        cached = key in self._held
        if not cached:
            self._held.add(key)
            self.loads += 1
        return Loaded(key, ["thing"]), cached

    def infer(
        self, loaded: Loaded, images: list[Any], *, conf: float, iou: float, image_format: str | None
    ) -> tuple[list[Any], float]:
        self.entered.set()
        self.threads.append(threading.get_ident())
        gate = self.gates.get(loaded.key)
        if gate is not None:
            assert gate.wait(10), "the test never opened the gate"
        self.calls.append((loaded.key, list(images)))
        if loaded.key in self.fail:
            raise RuntimeError(f"{loaded.key} broke")
        return [(loaded.key, image, conf) for image in images], 0.001


class Waiter:
    """One request's answer, once it comes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: BatchAnswer | BaseException | None = None

    def __call__(self, answer: BatchAnswer | BaseException) -> None:
        self.answer = answer
        self.event.set()

    def result(self) -> BatchAnswer:
        assert self.event.wait(10), "no answer"
        assert isinstance(self.answer, BatchAnswer), self.answer
        return self.answer


def _submit(batcher: Batcher, key: str, images: list[Any], conf: float = 0.5) -> Waiter:
    waiter = Waiter()
    batcher.submit(PredictRequest(key=key, images=images, conf=conf, iou=0.6, image_format=None, done=waiter))
    return waiter


def _hold(batcher: Batcher, engine: FakeEngine, key: str = "a") -> Waiter:
    """A request that occupies `key`'s runner (inside inference, at its gate) until the gate opens."""
    engine.gates[key] = threading.Event()
    waiter = _submit(batcher, key, ["hold"], conf=0.01)
    assert engine.entered.wait(10)
    return waiter


def test_requests_within_the_window_share_one_pass_and_get_their_own_images_in_order() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.5, max_images=16)
    first = _hold(batcher, engine)
    # Queued while the model is busy: the next batch waits the window for the ones that follow.
    waiters = [_submit(batcher, "a", ["r0-x", "r0-y", "r0-x"])]
    engine.gates["a"].set()
    assert first.result().batch_requests == 1
    threading.Event().wait(0.1)  # well inside the window
    waiters += [_submit(batcher, "a", [f"r{i}-x", f"r{i}-y", f"r{i}-x"]) for i in range(1, 4)]
    answers = [w.result() for w in waiters]
    for i, answer in enumerate(answers):
        assert answer.results == [("a", f"r{i}-x", 0.5), ("a", f"r{i}-y", 0.5), ("a", f"r{i}-x", 0.5)]
        assert (answer.batch_requests, answer.batch_images) == (4, 12)
    assert [len(images) for _, images in engine.calls] == [1, 12]
    assert batcher.stats.merged_requests == 4 and batcher.stats.largest_batch == 4


def test_a_request_to_an_idle_model_does_not_wait_for_the_window() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=30.0, max_images=16)
    for i in range(3):  # one client, one request at a time: the model is idle at each
        waiter = _submit(batcher, "a", [f"r{i}"])
        assert waiter.event.wait(10), "a lone request waited for the 30 s window"
        assert waiter.result().batch_requests == 1
    assert [len(images) for _, images in engine.calls] == [1, 1, 1]


def test_requests_queued_behind_a_running_batch_share_the_next_one() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.0, max_images=16)
    first = _hold(batcher, engine)
    waiters = [_submit(batcher, "a", [f"r{i}"]) for i in range(3)]
    engine.gates["a"].set()
    assert first.result().results == [("a", "hold", 0.01)] and first.result().cached is False
    for i, waiter in enumerate(waiters):
        assert waiter.result().results == [("a", f"r{i}", 0.5)]
        assert waiter.result().batch_requests == 3 and waiter.result().cached is True
    assert [len(images) for _, images in engine.calls] == [1, 3] and engine.loads == 1


def test_different_thresholds_are_not_merged() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.0, max_images=16)
    _hold(batcher, engine)
    low, high = _submit(batcher, "a", ["x"], conf=0.1), _submit(batcher, "a", ["y"], conf=0.9)
    engine.gates["a"].set()
    assert low.result().results == [("a", "x", 0.1)] and low.result().batch_requests == 1
    assert high.result().results == [("a", "y", 0.9)] and high.result().batch_requests == 1


def test_a_batch_stays_within_max_images_and_a_bigger_request_runs_alone_whole() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.0, max_images=4)
    _hold(batcher, engine)
    small = [_submit(batcher, "a", [f"s{i}a", f"s{i}b"]) for i in range(3)]
    big = _submit(batcher, "a", [f"b{i}" for i in range(7)])
    engine.gates["a"].set()
    assert big.result().results == [("a", f"b{i}", 0.5) for i in range(7)]
    for i, waiter in enumerate(small):
        assert waiter.result().results == [("a", f"s{i}a", 0.5), ("a", f"s{i}b", 0.5)]
    assert [len(images) for _, images in engine.calls] == [1, 4, 2, 7]


def test_a_long_inference_of_one_model_does_not_hold_up_another() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.0, max_images=16)
    slow = _hold(batcher, engine, "slow")
    fast = _submit(batcher, "fast", ["small"])
    assert fast.result().results == [("fast", "small", 0.5)]
    assert not slow.event.is_set()
    engine.gates["slow"].set()
    assert slow.result().results == [("slow", "hold", 0.01)]


def test_a_failed_batch_fails_each_of_its_requests_and_the_runner_goes_on() -> None:
    engine = FakeEngine(gates={"a": threading.Event()}, fail={"a"})
    batcher = Batcher(engine, window=0.05, max_images=16)
    waiters = [_submit(batcher, "a", [i]) for i in range(3)]
    engine.gates["a"].set()
    for waiter in waiters:
        assert waiter.event.wait(10)
        assert isinstance(waiter.answer, RuntimeError)
    engine.fail.clear()
    assert _submit(batcher, "a", ["again"]).result().results == [("a", "again", 0.5)]


@pytest.mark.parametrize("window", [0.0, 0.01])
def test_the_runner_ends_when_nothing_comes_within_its_linger(window: float) -> None:
    batcher = Batcher(FakeEngine(), window=window, max_images=16, linger=0.05)
    _submit(batcher, "a", ["x"]).result()
    assert batcher.running_models() == 0  # answered: nothing queued or running, whether it lingers
    for _ in range(200):
        if batcher.runners() == 0:
            break
        threading.Event().wait(0.01)
    assert batcher.runners() == 0
    assert _submit(batcher, "a", ["y"]).result().results == [("a", "y", 0.5)]


def test_a_lingering_runner_serves_the_models_next_request() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, window=0.0, max_images=16, linger=30.0)
    first = _submit(batcher, "a", ["x"]).result()
    threading.Event().wait(0.1)  # the runner is back waiting, idle
    assert (batcher.runners(), batcher.running_models()) == (1, 0)
    second = _submit(batcher, "a", ["y"]).result()
    assert (first.batch_requests, second.batch_requests) == (1, 1)
    assert len(engine.threads) == 2 and engine.threads[0] == engine.threads[1]
    # Another model gets a runner of its own, beside the lingering one.
    engine.gates["b"] = threading.Event()
    held = _submit(batcher, "b", ["z"])
    assert engine.entered.wait(10)
    assert (batcher.runners(), batcher.running_models()) == (2, 1)
    engine.gates["b"].set()
    assert held.result().results == [("b", "z", 0.5)]
    assert engine.threads[2] != engine.threads[0]
