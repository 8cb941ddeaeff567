"""The benchmark harness's measuring parts that a benchmark's figures rest on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import Turns, freeze_tree, running_seconds, thaw_tree, throughput

# A process that writes the time, every millisecond, to a file: when it ran, as it saw it.
_STAMPER = """
import sys, time
with open(sys.argv[1], "w", buffering=1) as out:
    while True:
        out.write(f"{time.time()}\\n")
        time.sleep(0.001)
"""


def _stamps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()]


def test_throughput_counts_only_the_seconds_a_process_ran() -> None:
    # 2 epochs of 4 batches of 8 images, one batch a second, the process stopped from 11.5 to 20.5:
    # the window (the first batch of epoch 2 to the last) is 13 s long but only 4 s of it ran.
    ends = [(0, b, float(b)) for b in range(4)] + [(1, 0, 10.0), (1, 1, 11.0), (1, 2, 21.0), (1, 3, 22.0)]
    turns = [(0.0, 11.5), (20.5, 30.0)]
    assert running_seconds(turns, 10.0, 22.0) == pytest.approx(3.0)
    ran = throughput(ends, 32, 8, turns)
    assert ran.images == 24 and ran.seconds == pytest.approx(3.0)
    assert ran.images_per_second == pytest.approx(8.0)
    assert ran.median_batch_s == pytest.approx(1.0)  # the 10 s gap across the stop is not a batch
    wall = throughput(ends, 32, 8)
    assert wall.seconds == pytest.approx(12.0) and wall.median_batch_s == pytest.approx(1.0)


def test_throughput_splits_the_window_into_batches_and_epoch_turns() -> None:
    # 3 epochs of 2 batches a second apart; 3 s between epochs 1 and 2 (validation, checkpoints).
    ends = [(0, 0, 0.0), (0, 1, 1.0), (1, 0, 4.0), (1, 1, 5.0), (2, 0, 9.0), (2, 1, 10.0)]
    wall = throughput(ends, 4, 2)
    assert (wall.seconds, wall.batch_s, wall.epoch_turns_s, wall.epoch_turns) == pytest.approx((6, 2, 4, 1))
    # Stopped from 6 to 8, inside the epoch turn: only its running seconds count.
    ran = throughput(ends, 4, 2, [(0.0, 6.0), (8.0, 20.0)])
    assert (ran.seconds, ran.batch_s, ran.epoch_turns_s, ran.epoch_turns) == pytest.approx((4, 2, 2, 1))


def test_turns_run_one_process_tree_at_a_time(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.txt" for name in ("a", "b")}
    # Each in a process group of its own, killed as a whole at the end. "b" runs its stamper as a
    # child, so stopping it means stopping its tree.
    procs = {
        "a": subprocess.Popen([sys.executable, "-c", _STAMPER, str(files["a"])], start_new_session=True),
        "b": subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])"]
            + [sys.executable, "-c", _STAMPER, str(files["b"])],
            start_new_session=True,
        ),
    }
    try:
        time.sleep(1.0)  # both started and stamping
        started = time.time()
        turns = Turns({name: p.pid for name, p in procs.items()}, window=0.3)
        turns.run({"a": lambda: time.time() - started > 1.5, "b": lambda: time.time() - started > 2.5})
        ended = time.time()
        time.sleep(0.3)  # both run again afterwards
        after = {name: [t for t in _stamps(path) if t > ended + 0.1] for name, path in files.items()}
    finally:
        for p in procs.values():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert all(after.values()), "a tree was left stopped"
    assert len(turns.turns["a"]) in (3, 4, 5) and len(turns.turns["b"]) >= len(turns.turns["a"])
    # From the first turn (after "b" was stopped) to the last one's end (then both run again).
    begin, last = turns.turns["a"][0][0], max(e for t in turns.turns.values() for _, e in t)
    for name, other in (("a", "b"), ("b", "a")):
        during = [t for t in _stamps(files[name]) if begin < t < last]
        assert len(during) > 100, name
        # Every stamp of one side falls in one of its own turns, none in the other's (a few ms
        # of slack: a stop lands while the loop is writing).
        inside = [t for t in during if any(s - 0.005 <= t <= e + 0.005 for s, e in turns.turns[name])]
        assert len(inside) == len(during), (name, len(during) - len(inside))
        assert not any(s + 0.005 < t < e - 0.005 for t in during for s, e in turns.turns[other]), name


def test_a_process_that_left_the_tree_while_stopped_is_thawed(tmp_path: Path) -> None:
    # A stamper run as the child of a parent that dies while both are stopped (a replaced fork
    # server does): the child is init's now, no longer in the tree, and must run again all the same.
    stamps = tmp_path / "child.txt"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])"]
        + [sys.executable, "-c", _STAMPER, str(stamps)],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (stamps.exists() and stamps.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = freeze_tree(parent.pid)
        assert len(stopped) == 2
        parent.kill()
        parent.wait()
        frozen = time.time()
        time.sleep(0.3)
        assert not [t for t in _stamps(stamps) if t > frozen + 0.05], "the child ran while stopped"
        thaw_tree(parent.pid, stopped)
        thawed = time.time()
        time.sleep(0.3)
        assert [t for t in _stamps(stamps) if t > thawed], "the child was left stopped"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child is still in the parent's process group
