"""The other ranks of a data-parallel job (`gpus` > 1), started and watched by its training process.

The job's training process (`worker.train_process`) is rank 0: it alone prepares the dataset, picks
the checkpoint to resume from, reports metrics and events, answers cancels, writes checkpoints and
records the outcome. Once it has the run's `TrainingConfig` it starts ranks 1..N-1 here, each a
fresh process (`python -m worker.ranks CONFIG`) that trains the same configuration with a reporter
that says nothing (`SilentReporter`); a cancel reaches them from rank 0 at the next batch
(`app.ml.distributed.agreed`), and super-gradients keeps checkpoints and logs to rank 0.

Rank 0 watches its helpers: one that dies mid-training would leave the others waiting in a
collective, so rank 0 then records how the attempt ended and exits at once (`on_lost`). A helper
killed by a signal (the out-of-memory killer, say) makes the attempt a lost one, resumed from the
last checkpoint as when the training process itself is killed. Helpers get SIGTERM when rank 0
exits (`die_with_parent`), so an attempt stopped or killed as a whole leaves none behind.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.ml.distributed import free_port, rank_environment
from app.ml.params import TrainingConfig
from app.ml.sg_setup import training_environment
from app.ml.types import MetricPoint, TrainingCancelled
from app.process import die_with_parent
from app.settings import Settings
from worker.outcome import killed_by_oom_killer, signal_name

logger = logging.getLogger("sgjobs.ranks")

HELPER_COMMAND: list[str] = [sys.executable, "-m", "worker.ranks"]
# In the job directory: the configuration rank 0 trains, read by the other ranks.
RANKS_CONFIG = "ranks.json"
# How often rank 0 looks at its helpers.
WATCH_SECONDS = 0.5
# How long rank 0, after its training raised, waits to see whether a helper died (and caused it).
LOST_RANK_SECONDS = 3.0
# How long the helpers of a training that ended well may take to tear down before they are killed.
HELPER_EXIT_SECONDS = 60.0


class SilentReporter:
    """The reporter of ranks 1..N-1: rank 0 reports for the job, and decides when it stops."""

    def metrics(self, points: list[MetricPoint]) -> None:
        pass

    def progress(self, *, epoch: int, max_epochs: int, batch: int, batches_per_epoch: int) -> None:
        pass

    def event(self, message: str, *, level: str = "info") -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def holds_lease(self) -> bool:
        return True


def describe_exit(rank: int, world_size: int, returncode: int) -> str:
    """How a helper ended, in words: the signal that killed it, or its exit code."""
    who = f"the training process of rank {rank} of {world_size}"
    if returncode < 0:
        oom = " (most likely the out-of-memory killer)" if killed_by_oom_killer(returncode) else ""
        return f"{who} was killed by {signal_name(returncode)}{oom}"
    return f"{who} exited with code {returncode}"


class Helpers:
    """Ranks 1..N-1 of this job, and the thread that watches them (see the module docstring)."""

    def __init__(
        self, procs: dict[int, subprocess.Popen[bytes]], world_size: int, on_lost: Callable[[str, int], None]
    ) -> None:
        self.procs = procs
        self.world_size = world_size
        self._on_lost = on_lost
        self._closing = threading.Event()
        self._lost_once = threading.Lock()
        self._watch = threading.Thread(target=self._run_watch, name="sgjobs-ranks", daemon=True)
        self._watch.start()

    def _run_watch(self) -> None:
        while not self._closing.wait(WATCH_SECONDS):
            if self.casualty() is not None:
                self.lost()
                return

    def casualty(self, within: float = 0.0) -> tuple[int, int] | None:
        """(rank, exit code) of a helper that exited with an error, waiting up to `within` seconds for
        one while any still runs; None when none did."""
        deadline = time.monotonic() + within
        while True:
            codes = {rank: proc.poll() for rank, proc in self.procs.items()}
            for rank, code in codes.items():
                if code is not None and code != 0:
                    return rank, code
            if all(code is not None for code in codes.values()) or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def lost(self) -> None:
        """Hand the first helper that died to `on_lost` (once, from whichever thread sees it first)."""
        found = self.casualty()
        if found is None or not self._lost_once.acquire(blocking=False):
            return
        rank, code = found
        message = describe_exit(rank, self.world_size, code)
        logger.error("%s: ending the attempt", message)
        self._on_lost(message, code)

    def close(self, *, wait: bool) -> None:
        """Stop watching, then let the helpers exit (`wait`: up to `HELPER_EXIT_SECONDS`, after a
        training that ended well) or stop them now (after an error, when they may wait in a
        collective that rank 0 will never join)."""
        self._closing.set()
        deadline = time.monotonic() + (HELPER_EXIT_SECONDS if wait else 0.0)
        for proc in self.procs.values():
            if proc.poll() is None and not wait:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def helper_ranks(
    settings: Settings, config: TrainingConfig, *, log_dir: Path, on_lost: Callable[[str, int], None]
) -> Iterator[Helpers | None]:
    """Make this process rank 0 of `config.world_size` and start the other ranks (None: one rank,
    nothing started); they are awaited when the block ends well and stopped when it raises.

    `log_dir`: super-gradients' log folder of the job, under which each helper gets `rankK` (SG
    truncates the console log of its folder when it is imported). `on_lost(message, returncode)` is
    called from the watch thread when a helper dies mid-training, and must end this process.
    """
    if config.world_size <= 1:
        yield None
        return
    port = free_port()
    os.environ.update(rank_environment(rank=0, world_size=config.world_size, port=port))
    config_file = config.job_dir / RANKS_CONFIG
    config_file.write_text(json.dumps(config.to_json()))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for rank in range(1, config.world_size):
            env = training_environment(
                settings,
                log_dir / f"rank{rank}",
                extra=rank_environment(rank=rank, world_size=config.world_size, port=port),
            )
            procs[rank] = subprocess.Popen(
                [*HELPER_COMMAND, str(config_file)],
                stdout=None,  # inherited: the job's console log, rank 0's file descriptor 1
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=config.job_dir,
                preexec_fn=die_with_parent(),
            )
    except BaseException:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        raise
    helpers = Helpers(procs, config.world_size, on_lost)
    try:
        yield helpers
    except BaseException:
        # A helper that died makes rank 0's next collective raise (gloo at once, a connection reset),
        # often before the watch sees the death: the death is what ended the attempt.
        if helpers.casualty(within=LOST_RANK_SECONDS) is not None:
            helpers.lost()
        helpers.close(wait=False)
        raise
    else:
        helpers.close(wait=True)
    finally:
        config_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Train one helper rank of the configuration in the file `argv[0]`, as its environment names."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m worker.ranks CONFIG_FILE", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainingConfig.from_json(json.loads(Path(args[0]).read_text()))
    from app.ml.training import run_training

    try:
        run_training(config, SilentReporter())
    except TrainingCancelled:
        return 0  # rank 0 stopped the job; it says so
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
