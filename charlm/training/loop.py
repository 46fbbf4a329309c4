"""The training loop: teacher forcing, truncated BPTT, clipped Adam (or SGD), LR annealing on
plateau, periodic validation, best and latest checkpoints, exact resume, and recovery from
non-finite steps. It knows nothing of the terminal: it reports through :class:`Callbacks`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from charlm.config import ModelConfig, OptimizerKind, RunConfig, TrainConfig
from charlm.data.batches import batchify, count_windows, token_counts, window
from charlm.data.corpus import describe
from charlm.data.prepare import prepare_corpus
from charlm.device import resolve_device, resolve_precision
from charlm.errors import CheckpointError, ConfigError, CorpusError, TrainingError
from charlm.model.network import RNNLM, Hidden, count_parameters, detach_hidden
from charlm.model.scoring import EvalResult, score, total_nats
from charlm.runs import checkpoint
from charlm.runs.checkpoint import Run, Snapshot
from charlm.training.distributed import SINGLE, Ranks, all_gather, all_reduce, rank_device, share
from charlm.training.stopping import StopRequest

# Non-finite steps: this many in a row restore the last good state, with the learning rate times
# RECOVERY_LR; after MAX_RECOVERIES restores without a good checkpoint in between, give up.
MAX_BAD_STEPS = 3
RECOVERY_LR = 0.5
MAX_RECOVERIES = 5
# Warn (once a run) of memorisation when this many validations in a row have not improved on the
# best held-out loss while the training loss has gone on falling below its value at the best.
OVERFIT_PATIENCE = 3
# Options that may change when a run is resumed (they do not change what was learned so far).
RESUMABLE_CHANGES = (
    "epochs", "max_steps", "max_time", "eval_every", "save_steps", "save_seconds", "device", "precision",
)  # fmt: skip


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
    clipped: float  # fraction of the steps since the last validation whose gradient was clipped
    tokens_per_sec: float
    elapsed: float
    fraction: float  # of the run done, by whichever stop condition is nearest


class Callbacks(Protocol):
    """What the training loop tells its caller; the CLI renders it, tests may record it."""

    def on_status(self, message: str) -> None: ...
    def on_progress(self, task: str, done: int, total: int) -> None: ...
    def on_step(self, report: StepReport) -> None: ...
    def on_eval(self, record: dict[str, Any]) -> None: ...


class SilentCallbacks:
    """Callbacks that ignore everything (library use, tests)."""

    def on_status(self, message: str) -> None:
        """Ignore."""

    def on_progress(self, task: str, done: int, total: int) -> None:
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
    stop_reason: str  # "epochs", "max_steps", "max_time", "interrupted" (SIGINT) or "terminated"
    best: EvalResult | None
    parameters: int
    skipped_steps: int = 0


def prepare_run(
    paths: Sequence[Path],
    config: RunConfig,
    out: Path,
    encoding: str = "utf-8",
    callbacks: Callbacks | None = None,
) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Prepare the corpus (see :func:`charlm.data.prepare.prepare_corpus`) and create the run directory.

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
        progress=cb.on_progress,
    )
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, vocab_size=corpus.tokenizer.vocab_size),
        corpus=tuple(str(p) for p in paths),
    )
    run = checkpoint.create_run(out, config, corpus.tokenizer, corpus.val_text, corpus.sha256)
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
    run = checkpoint.load_run(run_dir)
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
        run = checkpoint.update_config(run, config) if write else dataclasses.replace(run, config=config)
    if snapshot is None:
        if write:
            checkpoint.truncate_metrics(run, None)
        cb.on_status("no checkpoint yet: starting at step 0")
    else:
        cb.on_status(f"resuming {run.path} from step {snapshot.state['step']}")
    return run, corpus.train_ids, corpus.val_ids, snapshot


# Where each option given to a resumed run lives in its config: (section, field). The tokenizer's
# options have names of their own; the model's and the training's are their fields' names.
_OPTION_FIELDS: dict[str, tuple[str, str]] = {
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
        if name not in _OPTION_FIELDS:
            raise ConfigError(f"{_flag(name)} is not an option of a run")
        section, field_name = _OPTION_FIELDS[name]
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


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Plain SGD (the char-rnn / word_language_model recipe, with clipping) or Adam."""
    if config.optimizer is OptimizerKind.adam:
        return torch.optim.AdamW(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay)


def train_step(
    model: RNNLM,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: Hidden,
    clip: float,
    autocast: torch.dtype | None = None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Hidden, bool]:
    """One teacher-forced TBPTT update on a window, unless the loss or the gradient is not finite:
    then the weights and the optimizer are left untouched.

    Args:
        x, y: (T, B) inputs and targets (y is x one step ahead).
        hidden: the state carried from the previous window, already detached.
        autocast: run the forward pass under autocast to this dtype (bf16), or None for fp32;
            the weights, the gradients and the optimizer stay in fp32.
        agree: in a distributed run, makes the ranks' "not finite" flags (a scalar, 1 = not
            finite) one (the maximum), so all ranks skip a step together.

    Returns:
        The mean loss, the gradient norm before clipping, the new hidden state, and whether the
        update was applied.
    """
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss, new_hidden = model(x, hidden, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)  # global norm, NaN if any is
    bad = (~torch.isfinite(loss.detach() + grad_norm)).float()
    finite = not bool(agree(bad) if agree else bad)  # one sync a step: the price of safety
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm.detach(), new_hidden, finite


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
    """Training time (carried across resumes), throughput since the last report, and the
    fraction of the run done."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int, elapsed: float = 0.0) -> None:
        self.start = time.monotonic() - elapsed
        self.config = config
        limit = config.epochs * steps_per_epoch
        self.total_steps = max(1, min(limit, config.max_steps) if config.max_steps else limit)
        self._mark = (time.monotonic(), -1)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, step: int, elapsed: float | None = None) -> float:
        done = step / self.total_steps
        if self.config.max_time:
            done = max(done, (self.elapsed() if elapsed is None else elapsed) / self.config.max_time)
        return min(done, 1.0)

    def rate(self, tokens: int) -> float:
        now, (then, before) = time.monotonic(), self._mark
        self._mark = (now, tokens)
        return 0.0 if before < 0 else (tokens - before) / max(now - then, 1e-9)

    def out_of_time(self) -> bool:
        return self.config.max_time is not None and self.elapsed() >= self.config.max_time


@dataclass
class TrainingProgress:
    """Where a run stands: the plain part of a checkpoint (``state.json``). With the weights, the
    optimizer's tensors, the carried hidden state and the random generator states, it is
    everything the next step depends on, which is what makes resume exact."""

    step: int = 0
    epoch: int = 1  # 1-based, the epoch in progress
    window: int = 0  # the next window of the epoch
    tokens: int = 0
    best_loss: float = math.inf
    best: dict[str, Any] | None = None  # the EvalResult of the best validation
    plateau_scale: float = 1.0  # times ``anneal`` for each validation that did not improve
    recovery_scale: float = 1.0  # times RECOVERY_LR for each restore after non-finite steps
    skipped_steps: int = 0  # non-finite steps, never applied
    recoveries: int = 0  # restores since the last good validation
    bad_in_row: int = 0  # non-finite steps in a row, up to now
    elapsed: float = 0.0  # training seconds so far, across resumes
    validated_at: int | None = None
    loss_sum: float = 0.0  # training loss summed since the last validation ...
    loss_steps: int = 0  # ... over this many steps
    grad_norm: float = 0.0
    clipped_steps: int = 0  # steps since the last validation whose gradient norm exceeded --clip
    stale: int = 0  # validations since the best one
    train_at_best: float | None = None  # the training loss logged with the best validation
    overfit_warned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # informational: val loss, lr, interrupted

    def state_dict(self) -> dict[str, Any]:
        """Plain data for ``state.json`` (strict JSON: no best loss yet is null, not Infinity)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        data["best_loss"] = self.best_loss if self.best_loss < math.inf else None
        return {**data, **self.extra}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrainingProgress:
        """Inverse of :meth:`state_dict`.

        Raises:
            CheckpointError: a field is missing or of the wrong kind.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            progress = cls(**{k: v for k, v in state.items() if k in names})
            progress.best_loss = math.inf if progress.best_loss is None else float(progress.best_loss)
            int(progress.step), int(progress.epoch), int(progress.window), float(progress.loss_sum)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint state is damaged: {exc}") from exc
        return progress


class Trainer:
    """One run's model, optimizer, schedule and data, and the loop that trains them.

    Validation runs every ``eval_every`` steps, at every epoch end and at the end; an improvement
    saves ``best``, every validation (and every ``--save-every``) saves ``latest``, and a plateau
    multiplies the learning rate by ``anneal``. A SIGINT or SIGTERM (through ``stop``) saves
    ``latest`` at the next step boundary.
    """

    def __init__(
        self,
        run: Run,
        train_ids: torch.Tensor,
        val_ids: torch.Tensor,
        callbacks: Callbacks,
        stop: StopRequest | None = None,
        resume: Snapshot | None = None,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.run, self.val_ids, self.cb, self.ranks = run, val_ids, callbacks, ranks
        self.stop = stop or StopRequest()
        self.config = tc = run.config.train
        self.batch = share(tc.batch_size, ranks)  # this rank's streams
        self.device = rank_device(resolve_device(tc.device), ranks)
        self.autocast = resolve_precision(tc.precision, self.device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.model = RNNLM(run.config.model).to(self.device)
        if self.model.head is not None:  # the adaptive softmax wants frequent tokens first
            self.model.sort_by_frequency(token_counts(train_ids, run.config.model.vocab_size))
        self.optimizer = build_optimizer(self.model, tc)
        self.net: nn.Module = self.model
        if ranks.distributed:  # averages the gradients across ranks in backward
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                # the adaptive softmax skips a tail cluster that no target of the batch falls in
                find_unused_parameters=self.model.head is not None,
            )
            torch.manual_seed(tc.seed + ranks.rank)  # dropout masks of its own on each rank
        streams = batchify(train_ids, tc.batch_size)  # (B, L), memory-mapped: windows are read as used
        self.tokens_per_epoch = streams.numel()
        self.streams = streams[ranks.rank * self.batch : (ranks.rank + 1) * self.batch]  # (b, L): this rank's
        self.steps_per_epoch = count_windows(self.streams, tc.bptt)
        self.val_chars = len(run.heldout_text())
        self.progress = TrainingProgress()
        self.hidden = self.model.init_hidden(self.batch)
        self.resumed_from = None
        if resume is not None:
            self._restore(resume)
            self.resumed_from = self.progress.step
            if ranks.main:  # the log keeps exactly the validations this state has seen
                checkpoint.truncate_metrics(run, self.progress.validated_at)
        self.clock = _Clock(tc, self.steps_per_epoch, self.progress.elapsed)
        self._elapsed = self.progress.elapsed  # the ranks' agreed training time (distributed runs)
        self._loss_sum = torch.tensor(self.progress.loss_sum, device=self.device)  # since the last validation
        self._grad_norm = torch.tensor(self.progress.grad_norm)
        self._good = self._snapshot()  # the state a run of non-finite steps goes back to
        self._saved_at = (self.progress.step, self.clock.elapsed())

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def fit(self) -> TrainResult:
        """Train until a stop condition or a stop request."""
        p = self.progress
        where = f" from step {p.step}" if self.resumed_from is not None else ""
        processes = f" x {self.ranks.world} processes" if self.ranks.distributed else ""
        self.cb.on_status(
            f"training {count_parameters(self.model):,} parameters on {self.device.type}{processes} in "
            f"{'bf16' if self.autocast else 'fp32'}{where}: "
            f"{self.tokens_per_epoch:,} tokens, {self.steps_per_epoch} steps per epoch"
        )
        while True:
            stop = self._loop()
            if stop in ("interrupted", "terminated"):
                self._checkpoint((checkpoint.LATEST,), interrupted=True)
                break
            if self._validate():  # else it went back to the last good state: go on from there
                break
        if self.stop.requested:  # a signal during the last validation
            stop = self.stop.reason
        best = EvalResult(**p.best) if p.best else None
        return TrainResult(
            self.run.path, p.step, p.tokens, self.clock.elapsed(), stop, best,
            count_parameters(self.model), p.skipped_steps,
        )  # fmt: skip

    def _loop(self) -> str:
        """Step through the windows from where the run stands; returns why it stopped."""
        p, tc = self.progress, self.config
        while True:
            if p.window >= self.steps_per_epoch:
                if not self._validate():  # at least once an epoch, however small the corpus
                    continue  # went back to the last good state, maybe mid-epoch
                if p.epoch >= tc.epochs:
                    return "epochs"
                p.epoch, p.window = p.epoch + 1, 0
                self.hidden = self.model.init_hidden(self.batch)
            if tc.max_steps is not None and p.step >= tc.max_steps:
                return "max_steps"
            x, y = window(self.streams, p.window, tc.bptt)  # (T, B) each
            self._step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            if p.step % tc.eval_every == 0:
                self._validate()
            stop, out_of_time, save_due = self._agree()
            if save_due and p.step % tc.eval_every:
                self._checkpoint((checkpoint.LATEST,))
            if stop:
                return self.stop.reason if self.stop.requested else "terminated"
            if out_of_time:
                return "max_time"

    def _agree_bad(self, bad: torch.Tensor) -> torch.Tensor:
        """A non-finite step on any rank is a non-finite step on all (distributed runs)."""
        return all_reduce(bad, self.ranks, "max") if self.ranks.distributed else bad

    def _agree(self) -> tuple[bool, bool, bool]:
        """(stop requested, out of time, save due), the same on every rank: clocks and signals
        differ between processes, so a distributed run takes the latest of its ranks' times and
        stops if any rank was asked to (one small all-reduce a step)."""
        elapsed, stop, save = self.clock.elapsed(), self.stop.requested, self._save_due()
        if self.ranks.distributed:
            flags = torch.tensor([elapsed, stop, save], dtype=torch.float64, device=self.device)
            elapsed, stop, save = all_reduce(flags, self.ranks, "max").tolist()
            self._elapsed = elapsed
        limit = self.config.max_time
        return bool(stop), limit is not None and elapsed >= limit, bool(save)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Train on one window (T, B); a non-finite step is skipped, and a run of them restores
        the last good state with a lower learning rate."""
        p, tc = self.progress, self.config
        self._set_lr()
        loss, grad_norm, hidden, applied = train_step(
            self.net, self.optimizer, x, y, self.hidden, tc.effective_clip, self.autocast, self._agree_bad
        )
        p.step, p.window, p.tokens = p.step + 1, p.window + 1, p.tokens + x.numel() * self.ranks.world
        if applied:
            self.hidden = detach_hidden(hidden)
            self._loss_sum, p.loss_steps = self._loss_sum + loss, p.loss_steps + 1
            self._grad_norm = grad_norm
            p.clipped_steps += int(float(grad_norm) > tc.effective_clip)  # synced already: free
            p.bad_in_row = 0
        else:  # the carried state stays that of the last good step
            p.skipped_steps += 1
            p.bad_in_row += 1
            self.cb.on_status(
                f"step {p.step}: the loss or the gradient is not finite; step skipped "
                f"({p.skipped_steps} skipped in this run)"
            )
            if p.bad_in_row >= MAX_BAD_STEPS:
                self._recover(f"{MAX_BAD_STEPS} steps in a row were not finite")
                return
        if p.step % 10 == 0 or p.step == 1:
            self._report(loss)

    def _recover(self, why: str) -> None:
        """Go back to the last good state and lower the learning rate.

        Raises:
            TrainingError: it keeps failing.
        """
        p = self.progress
        skipped, recoveries, scale = p.skipped_steps, p.recoveries + 1, p.recovery_scale
        if recoveries > MAX_RECOVERIES:
            raise TrainingError(
                f"training diverged: {why} after {MAX_RECOVERIES} restores; the last good checkpoint "
                f"is in {self.run.path}; try a lower --lr or --clip"
            )
        self._restore(self._good)
        p.skipped_steps, p.recoveries = skipped, recoveries
        p.recovery_scale = scale * RECOVERY_LR  # lower each time, or the replay would fail again
        p.bad_in_row = 0
        self.cb.on_status(
            f"{why}: restored the state of step {p.step} and multiplied the learning rate by "
            f"{p.recovery_scale:g}"
        )

    def _set_lr(self) -> None:
        """Peak LR x plateau annealing x recovery x the final decay of a run whose end is known,
        from the state before the step (so a resumed run sets the same value)."""
        p = self.progress
        elapsed = self._elapsed if self.ranks.distributed else None  # the agreed time: the same lr everywhere
        scale = lr_scale(self.clock.fraction(p.step, elapsed), self.config.decay)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.effective_lr * p.plateau_scale * p.recovery_scale * scale

    def _report(self, loss: torch.Tensor) -> None:
        p, clock = self.progress, self.clock
        self.cb.on_step(
            StepReport(
                step=p.step, epoch=p.epoch, epochs=self.config.epochs, tokens=p.tokens, loss=loss.item(),
                lr=self.lr, grad_norm=float(self._grad_norm), clipped=p.clipped_steps / max(p.loss_steps, 1),
                tokens_per_sec=clock.rate(p.tokens),
                elapsed=clock.elapsed(), fraction=clock.fraction(p.step),
            )
        )  # fmt: skip

    def _validate(self) -> bool:
        """Score the held-out split, log it, checkpoint, and let the schedule react (once a step).

        Returns False if it found the model non-finite and went back to the last good state."""
        p = self.progress
        if p.validated_at == p.step:
            return True
        if not self._weights_finite():
            self._recover("the weights are not finite")
            return False
        part = (self.ranks.rank, self.ranks.world)  # each rank scores its share of the streams
        total = total_nats(
            self.model, self.val_ids, self.run.tokenizer.newline_id, autocast=self.autocast, part=part
        )
        result = score(all_reduce(total, self.ranks).item(), self.val_ids.numel(), self.val_chars)
        loss_sum = all_reduce(self._loss_sum.clone(), self.ranks) / self.ranks.world
        if not math.isfinite(result.loss):
            self._recover("the validation loss is not finite")
            return False
        p.validated_at, p.recoveries = p.step, 0
        record = {
            "step": p.step, "epoch": p.epoch, "tokens": p.tokens,
            "train_loss": (loss_sum / max(p.loss_steps, 1)).item(),
            "val_loss": result.loss, "val_ppl": result.perplexity, "val_bpc": result.bpc,
            "lr": self.lr, "grad_norm": float(self._grad_norm),
            "clipped_fraction": p.clipped_steps / max(p.loss_steps, 1), "skipped_steps": p.skipped_steps,
            "tokens_per_sec": p.tokens / max(self.clock.elapsed(), 1e-9), "elapsed": self.clock.elapsed(),
        }  # fmt: skip
        self._loss_sum, p.loss_steps, p.clipped_steps = torch.zeros((), device=self.device), 0, 0
        tags = [checkpoint.LATEST]
        if result.loss < p.best_loss:
            p.best_loss, p.best = result.loss, result.to_dict()
            p.stale, p.train_at_best = 0, record["train_loss"]
            tags.insert(0, checkpoint.BEST)
        else:  # validation stopped improving: anneal
            p.plateau_scale *= self.config.anneal
            p.stale += 1
            self._warn_overfit(record)
        p.extra = {"val_loss": result.loss, "val_bpc": result.bpc}
        if self.ranks.main:  # first: a resume drops records it has not saved
            checkpoint.append_metrics(self.run, record)
        self._checkpoint(tags)
        self.cb.on_eval(record)
        return True

    def _warn_overfit(self, record: dict[str, Any]) -> None:
        """Say once, with what to do, when held-out loss has stalled while training loss falls:
        the model is learning the training text by heart rather than the language."""
        p = self.progress
        if p.overfit_warned or p.stale < OVERFIT_PATIENCE or p.train_at_best is None:
            return
        if record["train_loss"] >= p.train_at_best:
            return
        p.overfit_warned = True
        self.cb.on_status(
            f"warning: held-out loss has not improved for {p.stale} validations (best {p.best_loss:.4f}) "
            f"while training loss fell from {p.train_at_best:.4f} to {record['train_loss']:.4f}: the model "
            "is memorising its corpus. best/ keeps the best checkpoint; for the next run, raise --dropout "
            "or --weight-drop, use a smaller model (--hidden), or train for less time"
        )

    def _save_due(self) -> bool:
        tc, (step, at) = self.config, self._saved_at
        if tc.save_steps is not None and self.progress.step - step >= tc.save_steps:
            return True
        return tc.save_seconds is not None and self.clock.elapsed() - at >= tc.save_seconds

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.model.parameters())

    def _checkpoint(self, tags: Sequence[str], interrupted: bool = False) -> None:
        """Save the current state under ``tags``, unless the weights are not finite (then go
        back to the last good state instead: nothing non-finite reaches the disk)."""
        if not self._weights_finite():
            self._recover("the weights are not finite")
            return
        p = self.progress
        if interrupted:
            p.extra = {**p.extra, "interrupted": True}
        snapshot = self._snapshot()
        whole = self._gather(snapshot)  # a collective: every rank takes part
        if self.ranks.main:
            for tag in tags:
                checkpoint.save_checkpoint(self.run, tag, whole)
        self._good, self._saved_at = snapshot, (p.step, self.clock.elapsed())
        p.extra.pop("interrupted", None)

    def _snapshot(self) -> Snapshot:
        """A deep copy of everything the next step depends on."""
        p = self.progress
        p.elapsed, p.loss_sum, p.grad_norm = (
            self.clock.elapsed(),
            float(self._loss_sum),
            float(self._grad_norm),
        )
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        trainer: dict[str, torch.Tensor] = {}
        opt = self.optimizer.state_dict()
        plain: dict[str, dict[str, Any]] = {}
        for index, entry in opt["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    trainer[f"optimizer.{index}.{name}"] = value.detach().clone()
                else:
                    plain.setdefault(str(index), {})[name] = value
        hidden = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
        for i, h in enumerate(hidden):
            trainer[f"hidden.{i}"] = h.detach().clone()
        trainer["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            trainer["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            **p.state_dict(),
            "optimizer": {"param_groups": opt["param_groups"], "state": plain},
        }
        return Snapshot(weights, trainer, state)

    def _gather(self, snapshot: Snapshot) -> Snapshot:
        """This rank's snapshot as a checkpoint of the whole run: the carried hidden state of every
        rank's streams, (layers, B, H) as one process would hold it, and every rank's random
        generator state (``rng.cpu.R`` for rank R > 0)."""
        if not self.ranks.distributed:
            return snapshot
        trainer = dict(snapshot.trainer)
        for name in [k for k in trainer if k.startswith("hidden.")]:
            trainer[name] = torch.cat(all_gather(trainer[name].to(self.device), self.ranks), 1).cpu()
        states = all_gather(trainer["rng.cpu"].to(self.device), self.ranks)
        trainer.update({f"rng.cpu.{r}": state.cpu() for r, state in enumerate(states) if r})
        if "rng.cuda" in trainer:
            states = all_gather(trainer["rng.cuda"].to(self.device), self.ranks)
            trainer.update({f"rng.cuda.{r}": state.cpu() for r, state in enumerate(states) if r})
        return Snapshot(snapshot.weights, trainer, {**snapshot.state, "ranks": self.ranks.world})

    def _restore(self, snapshot: Snapshot) -> None:
        """Put the model, optimizer, data position, hidden state and random generators back to
        ``snapshot`` (copies: the snapshot stays as it was).

        Raises:
            CheckpointError: the snapshot does not fit this run.
        """
        source = f"the checkpoint of step {snapshot.state.get('step')} in {self.run.path}"
        checkpoint.load_weights(self.model, snapshot.weights, source)
        restored = TrainingProgress.from_state(snapshot.state)
        for f in dataclasses.fields(restored):  # in place: the loop holds this object
            setattr(self.progress, f.name, getattr(restored, f.name))
        t = snapshot.trainer
        try:
            saved = snapshot.state["optimizer"]
            state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in saved["state"].items()}
            for key, value in t.items():
                if key.startswith("optimizer."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value.clone()
            self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
            n = 2 if isinstance(self.hidden, tuple) else 1
            hidden = tuple(t[f"hidden.{i}"].clone().to(self.device) for i in range(n))
            r, b = self.ranks.rank, self.batch
            whole = self.ranks.distributed and hidden[0].size(1) == self.config.batch_size
            if whole:  # a checkpoint of the whole run: this rank's streams
                hidden = tuple(h[:, r * b : (r + 1) * b].contiguous() for h in hidden)
            if any(h.shape[:2] != (self.run.config.model.layers, b) for h in hidden):
                raise ValueError(f"a hidden state of shape {tuple(hidden[0].shape)}")
            self.hidden = hidden if n == 2 else hidden[0]
            own = not whole or r == 0  # the generator states in the snapshot are this rank's
            if own or f"rng.cpu.{r}" in t:
                torch.set_rng_state(t["rng.cpu" if own else f"rng.cpu.{r}"].clone())
            else:  # resumed with more ranks than the checkpoint had: new dropout masks here
                torch.manual_seed(self.config.seed + r + 7919 * self.progress.step)
            cuda = "rng.cuda" if own else f"rng.cuda.{r}"
            if self.device.type == "cuda" and cuda in t:
                torch.cuda.set_rng_state(t[cuda].clone(), self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source} does not fit this run: {exc}") from exc
        self._loss_sum = torch.tensor(self.progress.loss_sum, device=self.device)
        self._grad_norm = torch.tensor(self.progress.grad_norm)


def fit(
    run: Run,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    callbacks: Callbacks | None = None,
    stop: StopRequest | None = None,
    resume: Snapshot | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Train the run's model on ``train_ids`` (N,), validating on ``val_ids`` (see :class:`Trainer`);
    ``resume`` continues from a checkpoint exactly where it stood; ``ranks`` places this process
    in a distributed run (see :mod:`charlm.training.distributed`)."""
    return Trainer(run, train_ids, val_ids, callbacks or SilentCallbacks(), stop, resume, ranks).fit()
