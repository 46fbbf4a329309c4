"""``charlm train --nproc-per-node N``: the training processes started by PyTorch's elastic
launcher, the engine ``torchrun`` runs, so a user needs no second command to train in several
processes, and no launcher of charlm's own stands between them and PyTorch's.

Each worker is ``python -m charlm train ARGS`` with torchrun's environment (``RANK``,
``WORLD_SIZE``, the rendezvous), so it is exactly a worker of ``torchrun -m charlm train ARGS``:
the same run, resumable by either. What differs is the ending. torchrun prints its own traceback
and a table of the failed ranks when a worker fails, after charlm's ranks have already said what
went wrong in one line (see :mod:`charlm.training.distributed`); here the launcher's logging is
kept quiet and a failure becomes the failed rank's exit code (or, for a rank killed by a signal,
one error), so the whole command ends as one process does.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from charlm.errors import ConfigError, TrainingError
from charlm.training.distributed import LAUNCHED

# How often the launcher looks at its workers (seconds; torchrun's default is 0.1).
MONITOR_INTERVAL = 0.1
# The launcher's own loggers: its warnings (one thread per process), its report of each failed
# worker and the signals it forwards are what a charlm rank has said already, or noise.
_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")


def launch(
    args: Sequence[str],
    processes: int,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> int:
    """Run ``charlm train ARGS`` in ``processes`` processes on this machine (of ``nodes``), as
    ``torchrun --nproc-per-node processes -m charlm train ARGS`` would, and wait for them.

    One machine and no address: the ranks meet on a free local port (torchrun's
    ``--standalone``). Several machines: each runs this with its ``node_rank``, all with the
    address and port of node 0 (torchrun's static rendezvous).

    Returns:
        0 when every rank finished; else the exit code of the first rank that failed, which has
        said why itself (130 after Ctrl-C, 143 when terminated).

    Raises:
        ConfigError: a count, rank or port out of range.
        TrainingError: a rank was killed by a signal (it could say nothing), or the ranks could
            not meet.
    """
    for value, field in ((processes, "nproc_per_node"), (nodes, "nnodes")):
        if value < 1:
            raise ConfigError(f"{{{field}}} must be at least 1, got {value}", fields=(field,))
    if not 0 <= node_rank < nodes:
        raise ConfigError(
            f"{{node_rank}} must be between 0 and {{nnodes}} - 1 ({nodes - 1}), got {node_rank}",
            fields=("node_rank", "nnodes"),
        )
    if master_port is not None and not 0 < master_port <= 65535:
        raise ConfigError(
            f"{{master_port}} must be between 1 and 65535, got {master_port}", fields=("master_port",)
        )
    if nodes > 1 and master_addr is None:
        raise ConfigError(
            "{nnodes} above 1 needs {master_addr}: the address of node 0, where the ranks meet",
            fields=("nnodes", "master_addr"),
        )
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    options = [
        f"--nproc-per-node={processes}", f"--nnodes={nodes}", f"--node-rank={node_rank}",
        f"--monitor-interval={MONITOR_INTERVAL}",
    ]  # fmt: skip
    if master_addr is not None:
        options.append(f"--master-addr={master_addr}")
    if master_port is not None:
        options.append(f"--master-port={master_port}")
    if nodes == 1 and master_addr is None and master_port is None:
        options.append("--standalone")
    parsed = torchrun.parse_args([*options, "-m", "charlm", "train", *args])
    os.environ[LAUNCHED] = "1"  # the ranks leave a lost peer to this launcher to report
    try:
        with _quiet():
            torchrun.run(parsed)
    except ChildFailedError as exc:
        # the first rank killed (the launcher stamps failures in seconds, and stops the ranks left
        # with SIGTERM once one has failed: at a tie, another signal is the cause)
        killed = sorted(
            (failure.timestamp, -failure.exitcode == signal.SIGTERM, rank, -failure.exitcode)
            for rank, failure in exc.failures.items()
            if failure.exitcode < 0
        )
        if killed:  # it could say nothing; the others lost it and left without a word
            *_, rank, number = killed[0]
            raise TrainingError(f"rank {rank} was killed by {_signal_name(number)}") from None
        return exc.get_first_failure()[1].exitcode  # the rank said why (rank 0, for a shared error)
    except SignalException as exc:  # the launcher was interrupted; it stopped the ranks likewise
        return 128 + int(exc.sigval)
    except Exception as exc:  # the rendezvous: a port taken, an address not reached
        raise TrainingError(f"the training processes could not start: {exc}") from None
    return 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@contextmanager
def _quiet() -> Iterator[None]:
    """The launcher's loggers silenced while it runs (see :data:`_LOGGERS`): each of its modules'
    own, which set their own levels, as well as their parents."""
    known = logging.Logger.manager.loggerDict
    names = {*_LOGGERS, *(name for name in known if name.startswith(_LOGGERS))}
    loggers = [logging.getLogger(name) for name in sorted(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.stderr.flush()
