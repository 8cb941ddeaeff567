"""The inference process's multiplexed protocol with a real child (`python -m app.ml.model_server`):
many calls in flight, each answered with its own answer; a dead or hung child fails every waiter
and is replaced on the next call. No model is loaded here (predictions: tests/prediction)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from app.ml.model_server import ModelServer, ModelServerError, ModelServerUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ModelServer]:
    handle = ModelServer(log_file=tmp_path / "inference.log", sg_log_dir=tmp_path / "sg", capacity=2)
    yield handle
    handle.close()


def _in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call on a thread of its own; what each returned or raised."""
    outcomes: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = calls[i]()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return outcomes


def _wait_for_waiters(server: ModelServer, count: int) -> None:
    for _ in range(1000):
        child = server._child
        if child is not None and len(child.pending) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} calls waiting")


def test_many_calls_in_flight_each_get_their_own_answer(server: ModelServer, tmp_path: Path) -> None:
    assert server.call("stats", timeout=60)["pid"] == server.pid  # started
    calls: list[Callable[[], Any]] = []
    for i in range(12):
        if i % 3 == 0:
            calls.append(partial(server.call, "inspect", timeout=60, path=str(tmp_path / f"missing-{i}.pth")))
        else:
            calls.append(lambda: server.call("stats", timeout=60))
    outcomes = _in_threads(calls)
    for i, outcome in enumerate(outcomes):
        if i % 3 == 0:
            # The error names this call's own file: answers are not crossed.
            assert isinstance(outcome, ModelServerError), outcome
            assert f"missing-{i}.pth" in outcome.message, outcome.message
        else:
            assert isinstance(outcome, dict) and outcome["pid"] == server.pid, outcome
    assert server.starts == 1
    with pytest.raises(ModelServerError) as unknown:
        server.call("no-such-op", timeout=60)
    assert unknown.value.kind == "internal"


def test_a_killed_child_fails_every_waiter_and_the_next_call_starts_another(server: ModelServer) -> None:
    pid = server.call("stats", timeout=60)["pid"]
    os.kill(pid, signal.SIGSTOP)  # answers nothing from now on, so the calls below all wait
    try:
        waiting = [lambda: server.call("stats", timeout=120) for _ in range(6)]

        def kill_when_all_wait() -> None:
            _wait_for_waiters(server, 6)
            os.kill(pid, signal.SIGKILL)

        outcomes = _in_threads([*waiting, kill_when_all_wait])
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    for outcome in outcomes[:6]:
        assert isinstance(outcome, ModelServerUnavailable), outcome
    again = server.call("stats", timeout=60)
    assert again["pid"] != pid and server.starts == 2


def test_a_hung_child_is_killed_when_a_call_times_out_and_every_waiter_hears(server: ModelServer) -> None:
    pid = server.call("stats", timeout=60)["pid"]
    os.kill(pid, signal.SIGSTOP)
    patient = [lambda: server.call("stats", timeout=300) for _ in range(4)]

    def impatient() -> Any:
        _wait_for_waiters(server, 4)
        return server.call("stats", timeout=2)

    outcomes = _in_threads([*patient, impatient])
    assert "did not answer within 2 s" in str(outcomes[-1])
    for outcome in outcomes:
        assert isinstance(outcome, ModelServerUnavailable), outcome
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert server.call("stats", timeout=60)["pid"] != pid and server.starts == 2
