"""Setting a run up: its corpus and directory (new or resumed, with the options a resume may
change), and the small builders the loop starts from (model, optimizer, this rank's streams)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from charlm.config import ModelConfig, OptimizerKind, RunConfig, TrainConfig, fit_to_corpus
from charlm.data.batches import batchify, token_counts
from charlm.data.corpus import describe
from charlm.data.prepare import prepare_corpus
from charlm.errors import CheckpointError, ConfigError, CorpusError
from charlm.model.network import RNNLM
from charlm.runs import checkpoint, rundir
from charlm.runs.checkpoint import Snapshot
from charlm.runs.rundir import Run
from charlm.training.distributed import Ranks, share
from charlm.training.report import Callbacks, SilentCallbacks

# Options that may change when a run is resumed (they do not change what was learned so far).
RESUMABLE_CHANGES = (
    "epochs", "max_steps", "max_time", "eval_every", "save_steps", "save_seconds", "device", "precision",
    "sample_every",
)  # fmt: skip


def prepare_run(
    paths: Sequence[Path],
    config: RunConfig,
    out: Path,
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
    given: Collection[str] | None = None,
) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Prepare the corpus (see :func:`charlm.data.prepare.prepare_corpus`) and create the run directory.

    ``given``: the config fields the user set; a scan cell's regularisation not among them follows
    the corpus's size (:func:`charlm.config.fit_to_corpus`, which says what it chose). None: all
    were set (the config is used as it is).

    Returns:
        The run, the training ids (N,) and the validation ids (M,).

    Raises:
        CorpusError, TokenizerError, CheckpointError: as their modules raise them; an ``out`` that
            already holds a run is refused before any work is done.
    """
    rundir.check_new_run(out)
    cb = callbacks or SilentCallbacks()
    corpus = prepare_corpus(
        paths,
        config.tokenizer,
        config.train.val_fraction,
        2 * config.train.batch_size,
        encoding,
        cb.on_status,
        progress=cb.on_progress,
    )
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size),
        corpus=tuple(str(p) for p in paths),
    )
    if given is not None:
        config, why = fit_to_corpus(config, corpus.train_ids.numel(), given)
        if why:
            cb.on_status(why)
    run = rundir.create_run(out, config, corpus.tokenizer, corpus.val_text, corpus.sha256)
    return run, corpus.train_ids, corpus.val_ids


def prepare_resume(
    run_dir: Path,
    paths: Sequence[Path | str] = (),
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
    changes: dict[str, Any] | None = None,
    write: bool = True,
) -> tuple[Run, torch.Tensor, torch.Tensor, Snapshot | None]:
    """Reopen a run to continue it: the same corpus (checked by checksum), its own tokenizer, and
    the newest checkpoint that verifies (falling back, and saying so, past damaged ones).

    ``changes`` holds the options a user gave again, by option name (see :func:`resumed_config`):
    a value equal to the run's own is accepted whatever the option, so the command that started a
    run, with ``--resume`` added, continues it; the options in :data:`RESUMABLE_CHANGES` may also
    take new values (a longer run, say), which are recorded in ``run.json``.

    Returns:
        The run, training ids (N,), validation ids (M,), and the snapshot to resume from (None if
        the run stopped before its first checkpoint: it starts again from step 0).

    Raises:
        CheckpointError: not a run, damaged beyond its checkpoints, or no checkpoint verifies.
        CorpusError: the corpus is not the text the run was trained on.
        ConfigError: ``changes`` gives another value to an option that cannot change mid-run.
    """
    cb = callbacks or SilentCallbacks()
    run = rundir.load_run(run_dir)
    config = resumed_config(run.config, changes or {})
    tc = config.train
    sources = list(paths) or list(config.corpus)
    corpus = prepare_corpus(
        sources, config.tokenizer, tc.val_fraction, 2 * tc.batch_size, encoding, cb.on_status, run.tokenizer,
        cb.on_progress,
    )  # fmt: skip
    if run.corpus_sha256 is not None and corpus.sha256 != run.corpus_sha256:
        raise CorpusError(
            f"{describe(sources)}: not the text {run.path} was trained on (its checksum differs); "
            "resume needs the same corpus"
        )
    if write:
        checkpoint.remove_unfinished_saves(run.path)
    snapshot, problems = checkpoint.newest_intact(run)
    for problem in problems:
        cb.on_status(f"skipping a damaged checkpoint: {problem}")
    if snapshot is None and problems:
        raise CheckpointError(f"{run.path}: no intact checkpoint to resume from")
    if config != run.config:
        run = rundir.update_config(run, config) if write else dataclasses.replace(run, config=config)
    if snapshot is None:
        if write:
            rundir.truncate_metrics(run, None)
        cb.on_status("no checkpoint yet: starting at step 0")
    else:
        cb.on_status(f"resuming {run.path} from step {snapshot.state['step']}")
    return run, corpus.train_ids, corpus.val_ids, snapshot


# Where each option given to a resumed run lives in its config: (section, field). The tokenizer's
# options have names of their own; the model's and the training's are their fields' names.
OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "kind"),
    "vocab_size": ("tokenizer", "vocab_size"),
    **{f.name: ("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"},
    **{f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)},
}


def resumed_config(saved: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """``saved`` with the options a resumed run was given (``changes``, by option name).

    An option given its saved value changes nothing, whatever it is (``--lr`` and ``--clip``
    compare with the learning rate and clip the run trains with, its optimizer's default where it
    gave none). Only the options in :data:`RESUMABLE_CHANGES` may take another value: the others
    decide what the run learned so far (its weights' shapes, its data, its schedule).

    Raises:
        ConfigError: an option takes another value than the run's and may not change, naming each
            such option with both values; or an unknown option; or the new values are invalid.
    """
    refused, train = [], {}
    for name, value in changes.items():
        if name not in OPTION_FIELDS:
            raise ConfigError(f"{_flag(name)} is not an option of a run")
        section, field_name = OPTION_FIELDS[name]
        own = getattr(getattr(saved, section), field_name)
        if name in ("lr", "clip") and value is not None:
            own = saved.train.effective_lr if name == "lr" else saved.train.effective_clip
        if name in RESUMABLE_CHANGES:
            train[name] = value
        elif value != own:
            refused.append(f"{_flag(name)} is {_shown(own)} in this run; {_shown(value)} given")
    if refused:
        allowed = [_flag(n) for n in RESUMABLE_CHANGES if n != "save_seconds"]
        raise ConfigError(
            f"{', and '.join(refused)} (only {', '.join(allowed[:-1])} and {allowed[-1]} may change when "
            "resuming; for the others, start a new run with another --out)"
        )
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, **train)) if train else saved


def _flag(name: str) -> str:
    """The command-line option that sets the config field ``name``."""
    return "--save-every" if name in ("save_steps", "save_seconds") else f"--{name.replace('_', '-')}"


def _shown(value: Any) -> str:
    """A config value as a user types it."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = repr(value)  # exact: two values never read alike
        return text[:-2] if text.endswith(".0") else text
    return "unset" if value is None else str(value)


# The pseudo-count of a token the training text never has, in the output bias's prior: a hundredth
# of one occurrence (256 byte pieces then start with about 1e-4 of the probability on 1 MB).
UNSEEN_COUNT = 0.01


def build_model(config: RunConfig, train_ids: torch.Tensor, device: torch.device) -> RNNLM:
    """The run's model on ``device``, initialised from the run's seed (the same on every rank);
    with the adaptive softmax, its vocabulary ordered by frequency in ``train_ids`` (N,).

    The output bias starts as the log of each token's frequency in the training text (as
    Karpathy's recipe for training networks advises), not zero. With a zero bias the scores from
    a near-empty state, as at the start of a sample with no prime, are near-uniform over the
    vocabulary, 256 byte pieces of it that the text may never have: samples of a run trained for
    25 s began with a stray byte one time in ten. The model never learns it away, since from the
    states it trains on the hidden state suppresses those tokens, and the bias's gradient then
    all but vanishes."""
    torch.manual_seed(config.train.seed)
    model = RNNLM(config.model).to(device)
    counts = token_counts(train_ids, config.model.vocab_size)  # (V,)
    if model.head is not None:  # the adaptive softmax wants frequent tokens first
        model.sort_by_frequency(counts)
    if model.decoder is not None:
        prior = counts.double() + UNSEEN_COUNT * (counts == 0)
        with torch.no_grad():
            model.decoder.bias.copy_(torch.log(prior / prior.sum()).to(model.decoder.bias.dtype))
    return model


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD (the char-rnn / word_language_model recipe, with clipping) or Adam."""
    if config.optimizer is OptimizerKind.adam:
        return torch.optim.AdamW(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay)


def distribute(model: RNNLM, device: torch.device, ranks: Ranks, seed: int) -> nn.Module:
    """The module the steps run through: ``model`` itself, or in a distributed run a
    DistributedDataParallel that averages the gradients across ranks in backward (then each rank
    draws dropout masks of its own)."""
    if not ranks.distributed:
        return model
    net = DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        # the adaptive softmax skips a tail cluster that no target of the batch falls in
        find_unused_parameters=model.head is not None,
    )
    torch.manual_seed(seed + ranks.rank)
    return net


def rank_streams(train_ids: torch.Tensor, batch_size: int, ranks: Ranks) -> tuple[torch.Tensor, int]:
    """This rank's share (b, L) of the run's ``batch_size`` streams of ``train_ids`` (N,), memory-
    mapped (windows are read as they are used), and the tokens of one epoch of all the streams."""
    streams = batchify(train_ids, batch_size)  # (B, L)
    b = share(batch_size, ranks)
    return streams[ranks.rank * b : (ranks.rank + 1) * b], streams.numel()
