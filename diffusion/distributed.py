"""Data-parallel training across the processes that ``torchrun`` starts (one per GPU).

``torchrun --nproc_per_node=N -m stages.train ddpm`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in each process; ``init()`` reads them and joins the process group:
NCCL with the GPU chosen by LOCAL_RANK when CUDA is available, gloo on the CPU. Without those
variables (a plain ``python -m ...``) nothing is initialised and every helper below acts as a
single process of rank 0.

How the N processes share the work (diffusion/training.py):

- ``train.batch_size`` is the batch of ONE process: an optimiser step sees N x batch_size
  images, and there are N times fewer steps per epoch. ``train.lr`` is used unchanged (no
  scaling rule is applied; scale it by hand if the larger batch needs it).
- Every process draws the same per-epoch permutation (same seed) and takes every N-th index of
  it, so the shards are disjoint and cover the epoch; t and the noise are drawn per process.
- DistributedDataParallel averages the gradients, so the weights, the EMA and the optimiser
  state stay identical on every process.
- Rank 0 alone computes the held-out loss and runs the per-epoch callbacks (log, grids, resume
  state, MLflow); the other processes wait for it at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world() -> World:
    """The current process group's rank and size; rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init(default: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group if launched by it; returns the world and this process's device.

    ``default`` is the single-process device; under torchrun a CUDA default becomes
    ``cuda:LOCAL_RANK`` (backend NCCL) and anything else stays on the CPU (backend gloo).
    """
    if not launched_by_torchrun():
        return World(), default
    local_rank = int(os.environ["LOCAL_RANK"])
    if default.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return world(), device


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op for a single process)."""
    if world().parallel:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op for a single process)."""
    if world().parallel:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if world().parallel:
        dist.barrier()
