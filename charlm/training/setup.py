"""Setting a run up as its plan (:mod:`charlm.training.plan`) says: its corpus and directory, new
or reopened, and the small builders the loop starts from (model, optimizer, this rank's streams)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from charlm.config import OptimizerKind, RunConfig, TrainConfig, fit_to_corpus
from charlm.data.batches import batchify, token_counts
from charlm.data.corpus import describe
from charlm.data.prepare import prepare_corpus
from charlm.errors import CheckpointError, CorpusError
from charlm.model.network import RNNLM
from charlm.runs import checkpoint, rundir
from charlm.runs.checkpoint import Snapshot
from charlm.runs.rundir import Parent, Run
from charlm.training.distributed import Ranks, share
from charlm.training.report import Callbacks, SilentCallbacks


def prepare_run(
    paths: Sequence[Path],
    config: RunConfig,
    out: Path,
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
    given: Collection[str] | None = None,
    parent: Parent | None = None,
) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Prepare the corpus (see :func:`charlm.data.prepare.prepare_corpus`) and create the run directory.

    ``given``: the config fields the user set; a scan cell's regularisation not among them follows
    the passes the run makes over its corpus (:func:`charlm.config.fit_to_corpus`, which says what
    it chose). None: all were set (the config is used as it is). ``parent``: the run a fine-tuned
    run starts from, whose tokenizer encodes the corpus (``config`` holds its tokenizer and model
    already).

    Returns:
        The run, the training ids (N,) and the validation ids (M,).

    Raises:
        CorpusError, TokenizerError, CheckpointError: as their modules raise them; an ``out`` that
            already holds a run is refused before any work is done.
    """
    rundir.check_new_run(out)
    cb = callbacks or SilentCallbacks()
    tokenizer = rundir.load_run(Path(parent.run)).tokenizer if parent is not None else None
    corpus = prepare_corpus(
        paths,
        config.tokenizer,
        config.train.val_fraction,
        config.train.val_pieces,
        2 * config.train.batch_size,
        encoding,
        cb.on_status,
        tokenizer,
        cb.on_progress,
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
    run = rundir.create_run(out, config, corpus.tokenizer, corpus.val_text, corpus.sha256, parent)
    return run, corpus.train_ids, corpus.val_ids


def prepare_resume(
    run_dir: Path,
    paths: Sequence[Path | str] = (),
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
    config: RunConfig | None = None,
    write: bool = True,
) -> tuple[Run, torch.Tensor, torch.Tensor, Snapshot | None]:
    """Reopen a run to continue it: the same corpus (checked by checksum), its own tokenizer, and
    the newest checkpoint that verifies (falling back, and saying so, past damaged ones).

    ``config``: the run's config with the changes its plan allowed (see
    :func:`charlm.training.plan.resumed_config`), recorded in ``run.json`` (with ``write``); None:
    the run's own. A fine-tuned run that stopped before its first checkpoint starts again from its
    parent's weights, which must still be the ones it recorded.

    Returns:
        The run, training ids (N,), validation ids (M,), and the snapshot to resume from (None if
        the run stopped before its first checkpoint: it starts again from step 0).

    Raises:
        CheckpointError: not a run, damaged beyond its checkpoints, or no checkpoint verifies.
        CorpusError: the corpus is not the text the run was trained on.
    """
    cb = callbacks or SilentCallbacks()
    run = rundir.load_run(run_dir)
    config = config or run.config
    tc = config.train
    sources = list(paths) or list(config.corpus)
    corpus = prepare_corpus(
        sources, config.tokenizer, tc.val_fraction, tc.val_pieces, 2 * tc.batch_size, encoding, cb.on_status,
        run.tokenizer, cb.on_progress,
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
        if run.parent is not None:
            parent_weights(run.parent)  # refused here, by every rank alike, not once training
        if write:
            rundir.truncate_metrics(run, None)
        cb.on_status("no checkpoint yet: starting at step 0")
    else:
        cb.on_status(f"resuming {run.path} from step {snapshot.state['step']}")
    return run, corpus.train_ids, corpus.val_ids, snapshot


def parent_weights(parent: Parent) -> dict[str, torch.Tensor]:
    """The weights a fine-tuned run starts from: its parent's checkpoint, verified, and still the
    one it recorded (the parent may have trained on since; a run started again from step 0 must
    start from the same weights).

    Raises:
        CheckpointError: the checkpoint is gone, damaged, or has other weights now.
    """
    path = Path(parent.run)
    now = checkpoint.weights_sha256(path, parent.checkpoint)
    if now != parent.weights_sha256:
        raise CheckpointError(
            f"the {parent.checkpoint} checkpoint of {path} is not the one this run started from any more "
            "(its weights changed since); start a new fine-tuned run from it"
        )
    directory = checkpoint.checkpoint_dir(path, parent.checkpoint)
    assert directory is not None  # it has a manifest: weights_sha256 read it
    return checkpoint.load_snapshot(directory).weights


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
    """Plain SGD (the char-rnn / word_language_model recipe, with clipping) or Adam. A weight decay
    left to the run (None) is set before each step by the trainer."""
    decay = config.weight_decay or 0.0
    if config.optimizer is OptimizerKind.adam:
        return torch.optim.AdamW(model.parameters(), lr=config.effective_lr, weight_decay=decay)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr, weight_decay=decay)


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
