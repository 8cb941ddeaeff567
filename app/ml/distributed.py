"""One job on several devices: super-gradients' data-parallel training (DDP), one process per rank.

The ranks of a job run on one machine (one worker slot's GPUs; on a CPU-only worker, its cores).
Rank 0 is the job's training process; it starts the other ranks (`worker.ranks`) with
`rank_environment`, the variables torch's `env://` rendezvous and super-gradients read. Every rank
then calls `app.ml.sg_setup.setup_device` with the world size, which joins the process group:
NCCL and one GPU per rank through SG's own `setup_device` in its distributed mode; on the CPU,
gloo (SG 3.7.1's DDP is CUDA-only: its `initialize_ddp` picks NCCL and a GPU per rank).

This module's top level imports only the standard library (the worker imports it); torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

# The ranks of a job share a machine: the rendezvous is on the loopback interface.
MASTER_ADDR = "127.0.0.1"
# How long a collective (and the rendezvous) waits for a rank that does not answer before it raises.
# A rank that died is noticed much sooner by rank 0's watch over its helpers (`worker.ranks`); this
# bounds a rank that hangs. Longer than any one batch or validation step of a real training.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# What `rank_environment` sets; nothing else differs between the ranks of one job.
RANK_VARIABLES: tuple[str, ...] = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def rank_environment(*, rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables of rank `rank` of `world_size` (all on this machine), meeting on `port`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within a world of {world_size}")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(port),
    }


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a job's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


def this_rank() -> tuple[int, int]:
    """(rank, world size) of this process from its environment; (0, 1) outside a data-parallel job."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join(device: str, world_size: int) -> str:
    """Join this job's process group as the rank its environment names, and make super-gradients
    train data-parallel; `device` is "cpu" or "cuda" (already chosen). Returns SG's device for this
    rank ("cuda:K" or "cpu:K"). Imports torch and super-gradients.
    """
    import torch
    import torch.distributed as dist
    from super_gradients import setup_device as sg_setup_device
    from super_gradients.common.data_types.enum.multi_gpu_mode import MultiGPUMode
    from super_gradients.common.environment.device_utils import device_config

    rank, size = this_rank()
    if size != world_size:
        raise ValueError(f"this process's WORLD_SIZE is {size}, the job asks for {world_size}")
    # SG reads LOCAL_RANK once, at its import; a spare training process imported it before its job.
    device_config.assigned_rank = rank
    if device == "cuda":
        if torch.cuda.device_count() < world_size:
            raise ValueError(
                f"the job asks for {world_size} GPUs, this worker sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(rank)  # before the group: NCCL binds each rank to its current GPU
        if not dist.is_initialized():
            # SG's initialize_ddp would use torch's default timeout; the same backend, ours.
            dist.init_process_group("nccl", init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        sg_setup_device(device="cuda", multi_gpu=MultiGPUMode.DISTRIBUTED_DATA_PARALLEL, num_gpus=world_size)
        return str(device_config.device)
    # The ranks share the machine's cores: each its own share, or they all oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    # "cpu:K" is the CPU to torch; SG reads a rank's index from its device name (its seeding does).
    device_config.device = f"cpu:{rank}"
    device_config.multi_gpu = MultiGPUMode.DISTRIBUTED_DATA_PARALLEL
    device_config.num_gpus = world_size
    return device_config.device


def agreed(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank (one small broadcast); `flag` itself outside a process group.

    Every rank must call it at the same point: a stop decided by rank 0 alone (a cancel) would leave
    the others waiting in their next collective.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from super_gradients.common.environment.device_utils import device_config

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device_config.device)
    dist.broadcast(value, src=0)
    return bool(value.item())
