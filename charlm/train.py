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
from charlm.data import batchify, read_corpus, split_text, windows
from charlm.device import resolve_device
from charlm.errors import CorpusError
from charlm.evaluate import EvalResult, evaluate
from charlm.model import Hidden, RNNLM, count_parameters, detach_hidden
from charlm.tokenizer import Tokenizer, train_tokenizer


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


def prepare_run(paths: Sequence[Path], config: RunConfig, out: Path, encoding: str = "utf-8",
                callbacks: Callbacks | None = None) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Read the corpus, split it, train the tokenizer on the training part, encode both parts
    and create the run directory.

    Returns:
        The run, the training ids (N,) and the validation ids (M,).

    Raises:
        CorpusError: the corpus is unusable or too small for the batch layout.
        TokenizerError, CheckpointError: as raised by the tokenizer and run directory.
    """
    cb = callbacks or SilentCallbacks()
    text = read_corpus(paths, encoding)
    train_text, val_text = split_text(text, config.train.val_fraction)
    if not val_text or not train_text:
        raise CorpusError(f"corpus of {len(text)} characters is too small to split off "
                          f"--val-fraction {config.train.val_fraction}")
    cb.on_status(f"training {config.tokenizer.kind.value} tokenizer on {len(train_text):,} characters")
    tokenizer = train_tokenizer(train_text, config.tokenizer)
    cb.on_status("encoding corpus")
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    tc = config.train
    needed = tc.batch_size * 2
    if train_ids.numel() < needed:
        raise CorpusError(
            f"corpus too small: {train_ids.numel()} training tokens cannot fill --batch-size "
            f"{tc.batch_size} streams of at least 2 tokens; use a larger corpus or smaller batch"
        )
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size),
        corpus=tuple(str(p) for p in paths),
    )
    run = checkpoint.create_run(out, config, tokenizer, val_text)
    return run, train_ids, val_ids


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD (the char-rnn / word_language_model recipe, with clipping) or Adam."""
    if config.optimizer is OptimizerKind.adam:
        return torch.optim.Adam(model.parameters(), lr=config.effective_lr)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr)


def train_step(model: RNNLM, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               hidden: Hidden, clip: float) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
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


def fit(run: Run, train_ids: torch.Tensor, val_ids: torch.Tensor,
        callbacks: Callbacks | None = None) -> TrainResult:
    """Train the run's model on ``train_ids`` (N,), validating on ``val_ids``.

    Validation runs every ``eval_every`` steps and at the end; an improvement saves ``best``, every
    validation saves ``latest``, and a plateau multiplies the learning rate by ``anneal``.
    Ctrl-C (KeyboardInterrupt) stops after saving ``latest``; the result says "interrupted".
    """
    cb = callbacks or SilentCallbacks()
    tc = run.config.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = RNNLM(run.config.model).to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=tc.anneal, patience=0)
    streams = batchify(train_ids, tc.batch_size).to(device)  # (T, B)
    steps_per_epoch = math.ceil((streams.size(0) - 1) / tc.bptt)
    val_chars = len(run.heldout_text())
    clock = _Clock(tc, steps_per_epoch)
    step = tokens = 0
    epoch = 1
    best: EvalResult | None = None
    window_loss = torch.zeros((), device=device)
    window_steps = 0
    last_grad = torch.zeros((), device=device)
    stop_reason = "epochs"
    cb.on_status(f"training {count_parameters(model):,} parameters on {device.type}: "
                 f"{train_ids.numel():,} tokens, {steps_per_epoch} steps per epoch")

    def validate() -> None:
        nonlocal best, window_loss, window_steps
        result = evaluate(model, val_ids, val_chars, run.tokenizer.newline_id)
        lr = optimizer.param_groups[0]["lr"]
        record = {
            "step": step, "epoch": epoch, "tokens": tokens,
            "train_loss": (window_loss / max(window_steps, 1)).item(),
            "val_loss": result.loss, "val_ppl": result.perplexity, "val_bpc": result.bpc,
            "lr": lr, "grad_norm": last_grad.item(),
            "tokens_per_sec": tokens / max(clock.elapsed(), 1e-9), "elapsed": clock.elapsed(),
        }
        window_loss, window_steps = torch.zeros((), device=device), 0
        checkpoint.append_metrics(run, record)
        state = {k: record[k] for k in ("step", "epoch", "tokens", "val_loss", "val_bpc", "lr")}
        if best is None or result.loss < best.loss:
            best = result
            checkpoint.save_checkpoint(run, checkpoint.BEST, model, state)
        checkpoint.save_checkpoint(run, checkpoint.LATEST, model, state)
        scheduler.step(result.loss)
        cb.on_eval(record)

    try:
        while stop_reason == "epochs" and epoch <= tc.epochs:
            hidden = model.init_hidden(tc.batch_size)
            for x, y in windows(streams, tc.bptt):
                loss, last_grad, hidden = train_step(model, optimizer, x, y, hidden, tc.clip)
                hidden = detach_hidden(hidden)
                step, tokens = step + 1, tokens + x.numel()
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if step % 10 == 0 or step == 1:
                    cb.on_step(StepReport(step, epoch, tc.epochs, tokens, loss.item(),
                                          optimizer.param_groups[0]["lr"], last_grad.item(),
                                          clock.rate(tokens), clock.elapsed(), clock.fraction(step)))
                if step % tc.eval_every == 0:
                    validate()
                if tc.max_steps is not None and step >= tc.max_steps:
                    stop_reason = "max_steps"
                elif clock.out_of_time():
                    stop_reason = "max_time"
                if stop_reason != "epochs":
                    break
            else:
                epoch += 1
        epoch = min(epoch, tc.epochs)
        if step % tc.eval_every != 0 or step == 0:
            validate()
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        state = {"step": step, "epoch": epoch, "tokens": tokens, "interrupted": True}
        checkpoint.save_checkpoint(run, checkpoint.LATEST, model, state)
    return TrainResult(run.path, step, tokens, clock.elapsed(), stop_reason, best,
                       count_parameters(model))
