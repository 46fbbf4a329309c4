"""The life of a training run, from a corpus and options to a result: its plan (new, fine-tuned
or resumed; see :mod:`charlm.training.plan`), the run directory's lock, removing a run that never
started, the hand-off between the ranks of a distributed run, and each rank's error boundary.
``charlm.train`` (Python) and ``charlm train`` (the shell) are this function.

Options are the command line's, by name with underscores (``batch_size=8``, ``max_time="10m"``).
A resumed run compares the options given with its own: equal values are fine whatever the option,
so the command that started a run, with ``--resume`` added, continues it (see
:func:`charlm.training.plan.resumed_config`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import torch

from charlm.config import CheckpointTag
from charlm.device import resolve_device
from charlm.errors import CharlmError, CheckpointError, ConfigError
from charlm.runs import rundir
from charlm.runs.checkpoint import Snapshot
from charlm.runs.lock import RunLock
from charlm.runs.rundir import Run
from charlm.training import distributed
from charlm.training.distributed import Ranks
from charlm.training.loop import fit
from charlm.training.plan import OPTION_FIELDS, Plan, config_changes, new_config, plan_run
from charlm.training.report import Callbacks, SilentCallbacks, TrainResult
from charlm.training.setup import prepare_resume, prepare_run
from charlm.training.stopping import StopRequest

Corpus = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
# The options of `charlm train`, by name: one per config field, except that `save_every` ("500" or
# "10m") sets two fields and `max_time` also takes a duration ("10m").
OPTIONS = frozenset(OPTION_FIELDS) - {"save_steps", "save_seconds"} | {"save_every"}


class _Prepared(NamedTuple):
    """What one rank needs to start training."""

    run: Run
    train_ids: torch.Tensor  # (N,)
    val_ids: torch.Tensor  # (M,)
    snapshot: Snapshot | None


def train_run(
    corpus: Corpus = (),
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    checkpoint: CheckpointTag | str | None = None,
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
    stop: threading.Event | None = None,
    on_error: Callable[[CharlmError], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Train a language model on ``corpus`` into the run directory ``out``.

    Args:
        corpus: text files, directories, glob patterns, compressed files; with ``resume`` it may be
            left out (the run's own).
        out: the run directory; default ``checkpoints/CORPUS-NAME`` (numbered if taken), or with
            ``resume`` the latest run of ``corpus``.
        resume: continue the run where its last checkpoint stopped, or start it if there is none
            yet and a corpus is given (one call serves a first launch and every relaunch).
        init_from: fine-tune: start a new run from this run's weights, with its tokenizer and
            model (its model options given again must keep its values; the training options are
            the ones given here, not the parent's). ``run.json`` records the parent and the
            SHA-256 of the weights it started from.
        checkpoint: which checkpoint of ``init_from``: "best" (the default; "latest" where the
            run has no best yet) or "latest".
        callbacks: told of progress (on rank 0 only); see :class:`Callbacks`.
        stop: set it (from a callback, another thread) to stop at the next step boundary, saving
            the latest state: the result's ``stop_reason`` is then "stopped". SIGINT and SIGTERM
            do the same when this runs in the main thread ("interrupted", "terminated").
        on_error: in a distributed run, rank 0 hands an error every rank shares (``settled``) to
            this before the ranks leave together (a face reports it there: torchrun stops the
            other ranks as soon as one has ended, so a report made after leaving may never be
            shown). An error of one rank alone is raised on that rank only, its message prefixed
            ``rank N:``.
        options: `charlm train`'s options by name, e.g. ``hidden=256, max_time="10m"``.

    Returns:
        How the run ended (its directory, steps, best validation).

    Raises:
        TypeError: an option that `charlm train` does not have.
        CharlmError: a mistake in the options or the corpus, a damaged run, a failed step (in a
            distributed run every rank raises an error that every rank shares, ``settled`` set).
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"train() got unexpected options: {', '.join(unknown)}")
    inputs = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    paths = [Path(p) for p in inputs]
    out_dir = Path(out) if out is not None else None
    parent = Path(init_from) if init_from is not None else None
    ranks = distributed.from_env()  # set by torchrun; one process otherwise
    cb = (callbacks or SilentCallbacks()) if ranks.main else SilentCallbacks()

    def plan(changes: dict[str, Any]) -> Plan:
        tag = checkpoint or CheckpointTag.best
        return plan_run(paths, out_dir, changes, resume=resume, init_from=parent, checkpoint_tag=tag)

    distributed.start(ranks)  # first, so that every failure below is one all ranks agree on
    try:
        with _rank_errors(ranks, on_error), ExitStack() as held, distributed.peers_lost(ranks):
            changes = distributed.settle(lambda: _check(options, resume, parent, checkpoint), ranks)
            # Rank 0 plans and prepares while the others wait, then they open the run it prepared.
            prepared = distributed.settle(
                lambda: (
                    _prepare_main(held, plan(changes), paths, encoding, cb, ranks) if ranks.main else None
                ),
                ranks,
            )
            if ranks.main:
                assert prepared is not None
                step = prepared.snapshot.state["step"] if prepared.snapshot else None
                distributed.broadcast((str(prepared.run.path), step), ranks)  # the others start now
                distributed.settle(lambda: None, ranks)  # while they open the run
            else:
                where, step = distributed.broadcast(None, ranks)  # type: ignore[misc]
                prepared = distributed.settle(lambda: _prepare_peer(where, step, paths, encoding), ranks)
            with StopRequest(stop) as request:
                result = fit(*prepared[:3], cb, request, prepared.snapshot, ranks)
            distributed.barrier(ranks)  # leave together: gloo aborts a rank whose peer has gone
    finally:
        distributed.stop()
    return result


@contextlib.contextmanager
def _rank_errors(ranks: Ranks, on_error: Callable[[CharlmError], None] | None) -> Iterator[None]:
    """The error boundary of one rank of a distributed run (nothing to do for one process).

    An error every rank shares (``settled``, see :func:`charlm.training.distributed.settle`) is
    handed to ``on_error`` by rank 0 alone, before the ranks leave together: every process of the
    run then fails as one process does, with one report. An error of this rank alone (a broken
    connection, a failed save) is raised as the same error prefixed ``rank N:``, for this rank to
    report itself.
    """
    try:
        yield
    except CharlmError as exc:
        if not ranks.distributed:
            raise
        if isinstance(exc, distributed.PeersLost) and os.environ.get(distributed.LAUNCHED):
            exc.settled = True  # the launcher says which rank ended (see PeersLost)
            raise
        if not exc.settled:
            raise distributed.on_rank(exc, ranks.rank) from exc
        if ranks.main and on_error is not None:
            on_error(exc)
        with contextlib.suppress(RuntimeError):  # a peer gone already: leave anyway
            distributed.barrier(ranks)
        raise


def _check(
    options: Mapping[str, Any], resume: bool, init_from: Path | None, tag: CheckpointTag | str | None
) -> dict[str, Any]:
    """What every rank refuses before any work: options that cannot be read, a new run's invalid
    config (a resumed or fine-tuned run's model comes from a run, checked when it is planned), a
    missing GPU. Returns the options as config values (see :func:`config_changes`)."""
    if tag is not None and init_from is None:
        raise ConfigError(
            "{checkpoint} chooses the weights of the run given as {init_from}: give that run too",
            fields=("checkpoint", "init_from"),
        )
    changes = config_changes(options)
    fresh = not resume and init_from is None
    resolve_device(new_config(changes, only=None if fresh else "train").train.device)
    return changes


def _prepare_main(
    held: ExitStack, plan: Plan, paths: list[Path], encoding: str, cb: Callbacks, ranks: Ranks
) -> _Prepared:
    """Rank 0 (or the only process) prepares and owns the run directory, under its lock."""
    distributed.share(plan.config.train.batch_size, ranks)  # before any work
    if not plan.run_dir.exists():  # a run that never started leaves nothing behind
        held.callback(rundir.remove_if_empty, plan.run_dir)
    rundir.make_run_dir(plan.run_dir)
    lock = held.enter_context(RunLock(plan.run_dir))
    if lock.stale_holder:
        cb.on_status(f"took over a stale lock ({lock.stale_holder} is gone)")
    if plan.resume:
        return _Prepared(*prepare_resume(plan.run_dir, paths, encoding, cb, plan.config))
    if plan.why:
        cb.on_status(plan.why)
    if plan.parent is not None:
        cb.on_status(f"starting from the {plan.parent.checkpoint} weights of {plan.parent.run}")
    run, train_ids, val_ids = prepare_run(
        paths, plan.config, plan.run_dir, encoding, cb, plan.given, plan.parent
    )
    return _Prepared(run, train_ids, val_ids, None)


def _prepare_peer(where: str, step: int | None, paths: list[Path], encoding: str) -> _Prepared:
    """Another rank: opens the run rank 0 prepared, and checks it sees the same checkpoint."""
    prepared = _Prepared(*prepare_resume(Path(where), paths, encoding, write=False))
    if (prepared.snapshot.state["step"] if prepared.snapshot else None) != step:
        raise CheckpointError(
            f"found another checkpoint than rank 0 in {where} (is the run directory on a filesystem "
            "every host sees?)"
        )
    return prepared
