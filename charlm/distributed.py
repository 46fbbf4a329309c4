"""Several training processes with PyTorch's own distributed stack, as ``torchrun`` launches them.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in each
process's environment; :func:`from_env` reads them, and :func:`start` joins the process group
(NCCL on CUDA, gloo on the CPU). Without ``torchrun`` a run is one process and every helper here
is a no-op, so the training loop has one code path.

How the work is shared (see :class:`charlm.train.Trainer`): the global ``--batch-size`` streams are
split into equal contiguous blocks, one per rank, each read from the memory-mapped token cache;
DistributedDataParallel averages the gradients, so each step equals a single process's step on
the whole batch; every decision that depends on a clock or a signal is agreed on by all ranks;
only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import distributed as dist

from charlm.errors import ConfigError

# Ranks other than 0 wait while rank 0 encodes the corpus (minutes for gigabytes).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks ``torchrun`` set in the environment (one process when it did not).

    Raises:
        ConfigError: the variables are there but not integers.
    """
    try:
        return Ranks(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as exc:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc


def share(batch_size: int, ranks: Ranks) -> int:
    """This rank's streams of a global ``batch_size``.

    Raises:
        ConfigError: the batch does not divide evenly among the ranks.
    """
    if batch_size % ranks.world:
        raise ConfigError(f"--batch-size {batch_size} must divide evenly among {ranks.world} processes")
    return batch_size // ranks.world


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """This rank's device: on CUDA in a distributed run, GPU ``LOCAL_RANK`` of this host."""
    if device.type == "cuda" and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device


def start(ranks: Ranks) -> None:
    """Join the process group (a no-op for one process): NCCL for CUDA tensors where there is
    a GPU, gloo for CPU tensors (the run's own ``--device`` decides which it uses)."""
    if ranks.distributed and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=TIMEOUT)


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End this rank's process at once, once its work is done and its process group left.

    At interpreter teardown, gloo's worker threads can abort a finished rank (SIGABRT, "terminate
    called without an active exception"; seen here about one run in ten, and reported upstream as
    pytorch/pytorch#190489), which torchrun then reports as a failed run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank."""
    if ranks.distributed:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, ranks: Ranks, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (``op="sum"``) or maximised (``"max"``) over the ranks, in place."""
    if ranks.distributed:
        dist.all_reduce(tensor, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather(tensor: torch.Tensor, ranks: Ranks) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in rank order."""
    if not ranks.distributed:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(ranks.world)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def broadcast(value: object, ranks: Ranks) -> object:
    """Rank 0's ``value`` on every rank (a small picklable object, such as a path)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
