"""Several training processes with PyTorch's own distributed stack, as ``torchrun`` launches them.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in each
process's environment; :func:`from_env` reads them, and :func:`start` joins the process group
(NCCL on CUDA, gloo on the CPU). Without ``torchrun`` a run is one process and every helper here
is a no-op, so the training loop has one code path.

How the work is shared (see :class:`charlm.training.loop.Trainer`): the global ``--batch-size`` streams are
split into equal contiguous blocks, one per rank, each read from the memory-mapped token cache;
DistributedDataParallel averages the gradients, so each step equals a single process's step on
the whole batch; every decision that depends on a clock or a signal is agreed on by all ranks;
only rank 0 writes the run directory.

Failing together: a rank that raised while its peers wait in a collective would leave them to die
of a broken connection, each with a traceback. So the steps that can fail on a user's mistake
(options, corpus, run directory) end in :func:`settle`, where every rank learns whether any rank
failed, and all raise the same error; a collective that fails because a peer has gone anyway
(:func:`peers_lost`) becomes an error of one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
from torch import distributed as dist

from charlm import errors
from charlm.errors import CharlmError, ConfigError, TrainingError

# Ranks other than 0 wait while rank 0 encodes the corpus (minutes for gigabytes).
TIMEOUT = timedelta(hours=2)
T = TypeVar("T")
# Set in the environment of the ranks that charlm's own launcher started (charlm.training.elastic).
LAUNCHED = "CHARLM_LAUNCHED"
# How gloo says that the other end of a connection has gone (a plain RuntimeError).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


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
        raise ConfigError(
            f"{{batch_size}} {batch_size} must divide evenly among {ranks.world} processes",
            fields=("batch_size",),
        )
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


def settle(action: Callable[[], T], ranks: Ranks) -> T:
    """Run ``action`` on this rank, then agree with every rank on how it went (a collective).

    If ``action`` raised a :class:`CharlmError` on any rank, every rank raises the error of the
    lowest such rank: its own exception where that is its own, else one of the same class, message
    (prefixed ``rank N:`` when N is not 0), fields and exit code. Each error raised here has
    ``settled`` set: every rank has it, so the launcher has rank 0 alone report it. With one
    process this is ``action()``.
    """
    if not ranks.distributed:
        return action()
    value: T | None = None
    own: CharlmError | None = None
    try:
        value = action()
    except CharlmError as exc:
        own = exc
    # the template and its fields, so that each face words the error as it does its own
    report = None if own is None else (type(own).__name__, own.template, own.fields, own.exit_code)
    reports: list[tuple[str, str, tuple[str, ...], int] | None] = [None] * ranks.world
    dist.all_gather_object(reports, report)
    failed = next(((rank, r) for rank, r in enumerate(reports) if r is not None), None)
    if failed is None:
        return value  # type: ignore[return-value]
    rank, (kind, template, fields, code) = failed
    if rank == ranks.rank and own is not None:
        error = own
    else:
        cls = getattr(errors, kind, CharlmError)
        error = (cls if isinstance(cls, type) and issubclass(cls, CharlmError) else CharlmError)(
            template, fields=fields
        )
        error.exit_code = code
        if rank != 0:
            error = on_rank(error, rank)
    error.settled = True
    if error is own:
        raise error
    raise error from own


def on_rank(error: CharlmError, rank: int) -> CharlmError:
    """``error`` as one rank's own: the same class, fields and exit code, its message prefixed
    ``rank N:`` (which of the processes it happened on)."""
    said = type(error)(f"rank {rank}: {error.template}", fields=error.fields)
    said.exit_code = error.exit_code
    return said


@contextmanager
def peers_lost(ranks: Ranks) -> Iterator[None]:
    """Turn a collective that failed because another rank has gone (it ended with its own error,
    or was killed) into a :class:`TrainingError` of one line, instead of gloo's traceback.

    Gloo says so with a plain ``RuntimeError`` ("Connection closed by peer"), NCCL and the store
    with a ``torch.distributed.DistError``; other errors pass through untouched.
    """
    try:
        yield
    except RuntimeError as exc:
        gone = isinstance(exc, dist.DistError) or any(words in str(exc) for words in _PEER_GONE)
        if not (ranks.distributed and gone):
            raise
        raise PeersLost(
            "lost contact with the other training processes: one of them ended (its own message "
            "says why) or the network failed"
        ) from exc


class PeersLost(TrainingError):
    """A collective failed because another rank has gone. Under ``charlm train --nproc-per-node``
    (:data:`LAUNCHED` set) the rank leaves without a word: the launcher says which rank ended and
    how, so the command has one error line, not one per surviving rank."""
