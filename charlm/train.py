"""The training loop: teacher forcing, truncated BPTT, clipped SGD (or Adam), LR annealing on
plateau, periodic validation, best and latest checkpoints. It knows nothing of the terminal: it
reports through :class:`Callbacks`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from charlm import checkpoint
from charlm.checkpoint import Run
from charlm.config import OptimizerKind, RunConfig, TrainConfig
from charlm.data import batchify, prepare_corpus, windows
from charlm.device import resolve_device
from charlm.evaluate import EvalResult, evaluate
from charlm.model import RNNLM, Hidden, count_parameters, detach_hidden


@dataclass(frozen=True)
class StepReport:
    """Where training stands, sent to :meth:`Callbacks.on_step` every few steps."""

    step: int
    epoch: int  # 1-based
    epochs: int
    tokens: int
    loss: float  # training loss (nats/token) of the latest step
    lr: float
    grad_norm: float  # before clipping
    tokens_per_sec: float
    elapsed: float
    fraction: float  # of the run done, by whichever stop condition is nearest


class Callbacks(Protocol):
    """What the training loop tells its caller; the CLI renders it, tests may record it."""

    def on_status(self, message: str) -> None: ...
    def on_step(self, report: StepReport) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...


class SilentCallbacks:
    """Callbacks that ignore everything (library use, tests)."""

    def on_status(self, message: str) -> None:
        """Ignore."""

    def on_step(self, report: StepReport) -> None:
        """Ignore."""

    def on_eval(self, record: dict[str, Any]) -> None:
        """Ignore."""


@dataclass(frozen=True)
class TrainResult:
    """How a run ended."""

    run_dir: Path
    steps: int
    tokens: int
    elapsed: float
    stop_reason: str  # "epochs", "max_steps", "max_time" or "interrupted"
    best: EvalResult | None
    parameters: int


def prepare_run(
    paths: Sequence[Path],
    config: RunConfig,
    out: Path,
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Prepare the corpus (see :func:`charlm.data.prepare_corpus`) and create the run directory.

    Returns:
        The run, the training ids (N,) and the validation ids (M,).

    Raises:
        CorpusError, TokenizerError, CheckpointError: as their modules raise them; an ``out`` that
            already holds a run is refused before any work is done.
    """
    checkpoint.check_new_run(out)
    cb = callbacks or SilentCallbacks()
    corpus = prepare_corpus(
        paths,
        config.tokenizer,
        config.train.val_fraction,
        2 * config.train.batch_size,
        encoding,
        cb.on_status,
    )
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size),
        corpus=tuple(str(p) for p in paths),
    )
    run = checkpoint.create_run(out, config, corpus.tokenizer, corpus.val_text)
    return run, corpus.train_ids, corpus.val_ids


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD (the char-rnn / word_language_model recipe, with clipping) or Adam."""
    if config.optimizer is OptimizerKind.adam:
        return torch.optim.Adam(model.parameters(), lr=config.effective_lr)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr)


def train_step(
    model: RNNLM,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: Hidden,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
    """One teacher-forced TBPTT update on a window.

    Args:
        x, y: (T, B) inputs and targets (y is x one step ahead).
        hidden: the state carried from the previous window, already detached.

    Returns:
        The mean loss and the gradient norm before clipping (as tensors, to avoid a device sync)
        and the new hidden state.
    """
    logits, hidden = model(x, hidden)  # (T, B, V)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)  # global norm
    optimizer.step()
    return loss.detach(), grad_norm.detach(), hidden


def lr_scale(fraction: float, decay: float) -> float:
    """Multiplier of the learning rate at ``fraction`` (0..1) of the run: 1, then a linear decay
    to 0 over the last ``decay`` of the run (0: no decay).

    Every run has a known end (epochs, ``--max-steps`` or ``--max-time``), and ending a
    fixed budget at a low learning rate gives a lower loss than stopping at the peak.
    """
    if decay <= 0 or fraction <= 1 - decay:
        return 1.0
    return max(0.0, (1.0 - fraction) / decay)


class _Clock:
    """Wall time, throughput since the last report, and the fraction of the run done."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.start = time.monotonic()
        self.config = config
        limit = config.epochs * steps_per_epoch
        self.total_steps = min(limit, config.max_steps) if config.max_steps else limit
        self._mark = (self.start, 0)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, step: int) -> float:
        done = step / self.total_steps
        if self.config.max_time:
            done = max(done, self.elapsed() / self.config.max_time)
        return min(done, 1.0)

    def rate(self, tokens: int) -> float:
        now, (then, before) = time.monotonic(), self._mark
        self._mark = (now, tokens)
        return (tokens - before) / max(now - then, 1e-9)

    def out_of_time(self) -> bool:
        return self.config.max_time is not None and self.elapsed() >= self.config.max_time


@dataclass
class TrainingProgress:
    """Where a run stands: what a checkpoint's ``state.json`` records."""

    step: int = 0
    epoch: int = 1  # 1-based, the epoch in progress
    tokens: int = 0
    best_loss: float = math.inf

    def state_dict(self) -> dict[str, Any]:
        """Plain data for ``state.json`` (strict JSON: no best loss yet is null, not Infinity)."""
        return {
            **dataclasses.asdict(self),
            "best_loss": self.best_loss if self.best_loss < math.inf else None,
        }


class Trainer:
    """One run's model, optimizer, schedule and data, and the loop that trains them.

    Validation runs every ``eval_every`` steps and at the end; an improvement saves ``best``, every
    validation saves ``latest``, and a plateau multiplies the learning rate by ``anneal``.
    """

    def __init__(
        self, run: Run, train_ids: torch.Tensor, val_ids: torch.Tensor, callbacks: Callbacks
    ) -> None:
        self.run, self.val_ids, self.cb = run, val_ids, callbacks
        self.config = tc = run.config.train
        self.device = resolve_device(tc.device)
        torch.manual_seed(tc.seed)
        self.model = RNNLM(run.config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, tc)
        self.plateau_scale = 1.0  # times ``anneal`` for each validation that did not improve
        self.streams = batchify(train_ids, tc.batch_size).to(self.device)  # (T, B)
        self.steps_per_epoch = math.ceil((self.streams.size(0) - 1) / tc.bptt)
        self.val_chars = len(run.heldout_text())
        self.progress = TrainingProgress()
        self.best: EvalResult | None = None
        self._validated_at: int | None = None
        self.clock = _Clock(tc, self.steps_per_epoch)
        self._loss_sum = torch.zeros((), device=self.device)  # since the last validation
        self._loss_steps = 0
        self._grad_norm = torch.zeros((), device=self.device)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def fit(self) -> TrainResult:
        """Train until a stop condition; Ctrl-C saves ``latest`` and ends with "interrupted"."""
        p, tc = self.progress, self.config
        self.cb.on_status(
            f"training {count_parameters(self.model):,} parameters on {self.device.type}: "
            f"{self.streams.numel():,} tokens, {self.steps_per_epoch} steps per epoch"
        )
        stop = None
        try:
            while stop is None:
                stop = self._epoch() or ("epochs" if p.epoch >= tc.epochs else None)
                p.epoch += stop is None
            self._validate()
        except KeyboardInterrupt:
            stop = "interrupted"
            state = {**p.state_dict(), "interrupted": True}
            checkpoint.save_checkpoint(self.run, checkpoint.LATEST, self.model, state)
        return TrainResult(
            self.run.path,
            p.step,
            p.tokens,
            self.clock.elapsed(),
            stop,
            self.best,
            count_parameters(self.model),
        )

    def _epoch(self) -> str | None:
        """One pass over the streams, the hidden state carried between windows; returns a stop
        reason if a step or time limit ended it early."""
        p, tc = self.progress, self.config
        hidden = self.model.init_hidden(tc.batch_size)
        for x, y in windows(self.streams, tc.bptt):
            loss, self._grad_norm, hidden = train_step(
                self.model, self.optimizer, x, y, hidden, tc.effective_clip
            )
            hidden = detach_hidden(hidden)
            p.step, p.tokens = p.step + 1, p.tokens + x.numel()
            self._set_lr()
            self._loss_sum, self._loss_steps = self._loss_sum + loss, self._loss_steps + 1
            if p.step % 10 == 0 or p.step == 1:
                self._report(loss)
            if p.step % tc.eval_every == 0:
                self._validate()
            if tc.max_steps is not None and p.step >= tc.max_steps:
                return "max_steps"
            if self.clock.out_of_time():
                return "max_time"
        self._validate()  # at least once an epoch, however small the corpus
        return None

    def _set_lr(self) -> None:
        """Peak LR x plateau annealing x the final decay of a run whose end is known."""
        scale = lr_scale(self.clock.fraction(self.progress.step), self.config.decay)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.effective_lr * self.plateau_scale * scale

    def _report(self, loss: torch.Tensor) -> None:
        p, clock = self.progress, self.clock
        self.cb.on_step(
            StepReport(
                step=p.step, epoch=p.epoch, epochs=self.config.epochs, tokens=p.tokens, loss=loss.item(),
                lr=self.lr, grad_norm=self._grad_norm.item(), tokens_per_sec=clock.rate(p.tokens),
                elapsed=clock.elapsed(), fraction=clock.fraction(p.step),
            )
        )  # fmt: skip

    def _validate(self) -> None:
        """Score the held-out split, log it, checkpoint, and let the schedule react (once a step)."""
        p = self.progress
        if self._validated_at == p.step:
            return
        self._validated_at = p.step
        result = evaluate(self.model, self.val_ids, self.val_chars, self.run.tokenizer.newline_id)
        record = {
            "step": p.step, "epoch": p.epoch, "tokens": p.tokens,
            "train_loss": (self._loss_sum / max(self._loss_steps, 1)).item(),
            "val_loss": result.loss, "val_ppl": result.perplexity, "val_bpc": result.bpc,
            "lr": self.lr, "grad_norm": self._grad_norm.item(),
            "tokens_per_sec": p.tokens / max(self.clock.elapsed(), 1e-9), "elapsed": self.clock.elapsed(),
        }  # fmt: skip
        self._loss_sum, self._loss_steps = torch.zeros((), device=self.device), 0
        checkpoint.append_metrics(self.run, record)
        state = {**p.state_dict(), "val_loss": result.loss, "val_bpc": result.bpc, "lr": self.lr}
        if result.loss < p.best_loss:
            p.best_loss, self.best = result.loss, result
            checkpoint.save_checkpoint(self.run, checkpoint.BEST, self.model, state)
        else:  # validation stopped improving: anneal
            self.plateau_scale *= self.config.anneal
        checkpoint.save_checkpoint(self.run, checkpoint.LATEST, self.model, state)
        self.cb.on_eval(record)


def fit(
    run: Run, train_ids: torch.Tensor, val_ids: torch.Tensor, callbacks: Callbacks | None = None
) -> TrainResult:
    """Train the run's model on ``train_ids`` (N,), validating on ``val_ids`` (see :class:`Trainer`)."""
    return Trainer(run, train_ids, val_ids, callbacks or SilentCallbacks()).fit()
