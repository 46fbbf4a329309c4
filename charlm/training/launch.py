"""The life of a training run, from a corpus and options to a result: a new run or a resumed one,
the run directory's lock, removing a run that never started, and the hand-off between the ranks of
a distributed run. ``charlm.train`` (Python) and ``charlm train`` (the shell) are this function.

Options are the command line's, by name with underscores (``batch_size=8``, ``max_time="10m"``).
A resumed run compares the options given with its own: equal values are fine whatever the option,
so the command that started a run, with ``--resume`` added, continues it (see
:func:`charlm.training.setup.resumed_config`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import torch

from charlm.config import (
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    parse_duration,
    parse_save_every,
)
from charlm.device import resolve_device
from charlm.errors import CharlmError, CheckpointError, ConfigError
from charlm.runs import rundir
from charlm.runs.checkpoint import Snapshot
from charlm.runs.lock import RunLock
from charlm.runs.rundir import Run
from charlm.training import distributed
from charlm.training.distributed import Ranks
from charlm.training.loop import fit
from charlm.training.report import Callbacks, SilentCallbacks, TrainResult
from charlm.training.setup import OPTION_FIELDS, prepare_resume, prepare_run, resumed_config
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
        callbacks: told of progress (on rank 0 only); see :class:`Callbacks`.
        stop: set it (from a callback, another thread) to stop at the next step boundary, saving
            the latest state: the result's ``stop_reason`` is then "stopped". SIGINT and SIGTERM
            do the same when this runs in the main thread ("interrupted", "terminated").
        on_error: in a distributed run, rank 0 hands an error every rank shares to this before
            the ranks leave together (a face reports it there: torchrun stops the other ranks as
            soon as one has ended, so a report made after leaving may never be shown).
        options: `charlm train`'s options by name, e.g. ``hidden=256, max_time="10m"``.

    Returns:
        How the run ended (its directory, steps, best validation).

    Raises:
        TypeError: an option that `charlm train` does not have.
        CharlmError: a mistake in the options or the corpus, a damaged run, a failed step (under
            torchrun, every rank raises the same error).
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(f"train() got unexpected options: {', '.join(unknown)}")
    inputs = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    paths = [Path(p) for p in inputs]
    out_dir = Path(out) if out is not None else None
    ranks = distributed.from_env()  # set by torchrun; one process otherwise
    cb = (callbacks or SilentCallbacks()) if ranks.main else SilentCallbacks()
    distributed.start(ranks)  # first, so that every failure below is one all ranks agree on
    try:
        with ExitStack() as held, distributed.peers_lost(ranks):
            changes, config = distributed.settle(lambda: _check(options, resume, ranks), ranks)
            # Rank 0 prepares while the others wait, then they open the run it prepared.
            prepared = distributed.settle(
                lambda: (
                    _prepare_main(held, paths, out_dir, resume, encoding, cb, changes, config, ranks)
                    if ranks.main
                    else None
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
    except CharlmError as exc:
        if ranks.distributed and getattr(exc, "settled", False):
            # Every rank has this error: rank 0 hands it to the face, then all leave together.
            if ranks.main and on_error is not None:
                on_error(exc)
                exc.reported = True  # type: ignore[attr-defined]
            distributed.barrier(ranks)
        raise
    finally:
        distributed.stop()
    return result


def config_changes(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (by option name) as config values by field name: ``save_every`` parsed into
    ``save_steps`` and ``save_seconds``, a ``max_time`` duration into seconds, and the names of
    choices ("gru", "bf16") into their enums.

    Raises:
        ConfigError: a value that cannot be read.
    """
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if name == "save_every":
            changes["save_steps"], changes["save_seconds"] = parse_save_every(str(value))
            continue
        if name == "max_time" and isinstance(value, str):
            value = parse_duration(value)
        section, field_name = OPTION_FIELDS[name]
        kind = type(_DEFAULTS[section].__dataclass_fields__[field_name].default)
        if issubclass(kind, Enum) and not isinstance(value, kind):
            try:
                value = kind(value)
            except ValueError:
                choices = ", ".join(str(c.value) for c in kind)  # type: ignore[attr-defined]
                flag = f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} is one of {choices}; {value!r} given") from None
        changes[name] = value
    return changes


_DEFAULTS: dict[str, Any] = {"tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}


def new_config(changes: Mapping[str, Any], only: str | None = None) -> RunConfig:
    """The config of a new run: the defaults, with ``changes`` (see :func:`config_changes`); with
    ``only`` ("train", say), the changes to that section alone.

    Raises:
        ConfigError: an invalid value.
    """
    sections: dict[str, dict[str, Any]] = {"tokenizer": {}, "model": {}, "train": {}}
    for name, value in changes.items():
        section, field_name = OPTION_FIELDS[name]
        if only in (None, section):
            sections[section][field_name] = value
    try:
        return RunConfig(
            tokenizer=TokenizerConfig(**sections["tokenizer"]),
            model=ModelConfig(**sections["model"]),
            train=TrainConfig(**sections["train"]),
        )
    except TypeError as exc:  # a value of the wrong kind, compared in a check
        raise ConfigError(f"an option has a value of the wrong kind: {exc}") from exc


def _check(options: Mapping[str, Any], resume: bool, ranks: Ranks) -> tuple[dict[str, Any], RunConfig | None]:
    """What every rank refuses before any work: the options, a new run's config (a resumed run
    keeps its own), its batch split among the ranks, and a missing GPU. Returns the options as
    config values (see :func:`config_changes`) and a new run's config."""
    changes = config_changes(options)
    if resume:  # the run's own config, with the changes, is checked once the run is open
        resolve_device(new_config(changes, only="train").train.device)
        return changes, None
    config = new_config(changes)
    resolve_device(config.train.device)
    distributed.share(config.train.batch_size, ranks)
    return changes, config


def _prepare_main(
    held: ExitStack,
    paths: list[Path],
    out: Path | None,
    resume: bool,
    encoding: str,
    cb: Callbacks,
    changes: dict[str, Any],
    config: RunConfig | None,
    ranks: Ranks,
) -> _Prepared:
    """Rank 0 (or the only process) prepares and owns the run directory, under its lock."""
    run_dir, starting = rundir.train_dir(out, paths, resume)
    if not run_dir.exists():  # a run that never started leaves nothing behind
        held.callback(rundir.remove_if_empty, run_dir)
    rundir.make_run_dir(run_dir)
    lock = held.enter_context(RunLock(run_dir))
    if lock.stale_holder:
        cb.on_status(f"took over a stale lock ({lock.stale_holder} is gone)")
    if resume and (run_dir / rundir.RUN_FILE).is_file():  # decided under the lock
        resumed = resumed_config(rundir.load_run(run_dir).config, changes)  # before any work
        distributed.share(resumed.train.batch_size, ranks)
        return _Prepared(*prepare_resume(run_dir, paths, encoding, cb, changes))
    if config is None:  # resume, and no run yet
        config = new_config(changes)
        distributed.share(config.train.batch_size, ranks)
    if starting:
        cb.on_status(starting)
    given = {OPTION_FIELDS[name][1] for name in changes if name in OPTION_FIELDS}
    return _Prepared(*prepare_run(paths, config, run_dir, encoding, cb, given), None)


def _prepare_peer(where: str, step: int | None, paths: list[Path], encoding: str) -> _Prepared:
    """Another rank: opens the run rank 0 prepared, and checks it sees the same checkpoint."""
    prepared = _Prepared(*prepare_resume(Path(where), paths, encoding, write=False))
    if (prepared.snapshot.state["step"] if prepared.snapshot else None) != step:
        raise CheckpointError(
            f"found another checkpoint than rank 0 in {where} (is the run directory on a filesystem "
            "every host sees?)"
        )
    return prepared
