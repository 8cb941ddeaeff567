"""The pieces of a data-parallel job that need no process group: the ranks' environment, the
configuration the other ranks read, the queues a slot consumes and how a helper's end is told.
(The training itself, two real ranks over gloo, is `tests/worker/test_data_parallel.py`.)"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest

from app.jobs.lifecycle import spec_gpus
from app.ml.distributed import RANK_VARIABLES, free_port, rank_environment
from app.ml.params import TrainingConfig, TrainingSpec
from app.ml.types import SplitFiles
from app.queue import queue_for, worker_queues
from app.settings import Settings
from worker.ranks import describe_exit


def test_each_rank_gets_its_own_rank_and_the_same_rendezvous() -> None:
    port = free_port()
    envs = [rank_environment(rank=r, world_size=3, port=port) for r in range(3)]
    assert all(set(env) == set(RANK_VARIABLES) for env in envs)
    assert [env["RANK"] for env in envs] == ["0", "1", "2"]
    assert {(env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) for env in envs} == {
        ("3", "127.0.0.1", str(port))
    }
    with pytest.raises(ValueError, match="rank 3 is not within a world of 3"):
        rank_environment(rank=3, world_size=3, port=port)


def test_the_configuration_reaches_the_other_ranks_unchanged(tmp_path: Path) -> None:
    split = SplitFiles(tmp_path / "train", tmp_path / "train" / "a.json", 16)
    config = TrainingConfig(
        model="yolo_nas_s",
        job_dir=tmp_path / "job",
        class_names=("a", "b"),
        train=split,
        val=dataclasses.replace(split, num_images=8),
        input_size=(64, 96),
        training=TrainingSpec(max_epochs=3, batch_size=4, lr_warmup_epochs=0, seed=7, ema=True),
        num_workers=2,
        init_checkpoint=tmp_path / "init.pth",
        resume_from=None,
        device="cpu",
        world_size=2,
    )
    assert TrainingConfig.from_json(config.to_json()) == config
    resumed = dataclasses.replace(config, init_checkpoint=None, resume_from=tmp_path / "ckpt_latest.pth")
    assert TrainingConfig.from_json(resumed.to_json()) == resumed


def test_a_slot_consumes_the_queues_of_every_job_size_it_can_train() -> None:
    settings = Settings(task_queue="q", worker_queue="big", worker_gpus_per_slot=3)
    assert worker_queues(settings) == ["q.big", "q.big.gpus2", "q.big.gpus3"]
    assert worker_queues(Settings(task_queue="q")) == ["q"]
    # A job goes to the queue of its size: only slots that offer that many take it.
    assert queue_for(settings, None, 1) == "q"
    assert queue_for(settings, None, 4) == "q.gpus4"
    assert queue_for(settings, "big", 2) == "q.big.gpus2"


def test_stored_specs_ask_for_one_gpu_unless_they_say_more() -> None:
    assert spec_gpus(None) == 1
    assert spec_gpus({}) == 1  # stored before the field existed
    assert spec_gpus({"gpus": 1}) == 1
    assert spec_gpus({"gpus": 4}) == 4


def test_gpu_ids_are_split_into_slots() -> None:
    settings = Settings(worker_gpus="0,1,2,3", worker_gpus_per_slot=2)
    assert settings.worker_slots == [["0", "1"], ["2", "3"]]
    assert Settings(worker_gpus="4,5").worker_slots == [["4"], ["5"]]
    assert Settings().worker_slots == []
    with pytest.raises(ValueError, match="lists 3 GPUs, not a multiple of worker_gpus_per_slot 2"):
        Settings(worker_gpus="0,1,2", worker_gpus_per_slot=2)


def test_a_helpers_end_names_the_signal_that_killed_it_or_its_exit_code() -> None:
    assert describe_exit(1, 2, -signal.SIGKILL) == (
        "the training process of rank 1 of 2 was killed by SIGKILL (most likely the out-of-memory killer)"
    )
    assert describe_exit(2, 4, -signal.SIGSEGV) == "the training process of rank 2 of 4 was killed by SIGSEGV"
    assert describe_exit(1, 2, 1) == "the training process of rank 1 of 2 exited with code 1"
