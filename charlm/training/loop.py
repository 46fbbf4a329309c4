"""The training loop: teacher forcing, truncated BPTT, clipped Adam (or SGD), LR annealing on
plateau, periodic validation, best and latest checkpoints, exact resume, and recovery from
non-finite steps. It knows nothing of the terminal: it reports through :class:`Callbacks`.

The pieces it is built from each have a module: :mod:`~charlm.training.setup` (the run and the
builders), :mod:`~charlm.training.step`, :mod:`~charlm.training.schedule` and
:mod:`~charlm.training.state` (capture and restore).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from charlm.config import weight_decay_for
from charlm.data.batches import count_windows, window
from charlm.device import resolve_device, resolve_precision
from charlm.errors import Notice, TrainingError
from charlm.generation.sampling import sample_text
from charlm.model.network import count_parameters, detach_hidden
from charlm.model.scoring import EvalResult, score, total_nats
from charlm.runs import checkpoint, rundir
from charlm.runs.checkpoint import Snapshot
from charlm.runs.rundir import Run
from charlm.training.distributed import SINGLE, Ranks, all_reduce, rank_device, share
from charlm.training.report import Callbacks, SilentCallbacks, StepReport, TrainResult
from charlm.training.schedule import Clock, lr_scale
from charlm.training.setup import (
    build_model,
    build_optimizer,
    distribute,
    parent_weights,
    prepare_resume,
    prepare_run,
    rank_streams,
)
from charlm.training.state import TrainState
from charlm.training.step import train_step
from charlm.training.stopping import StopRequest

__all__ = ["Trainer", "fit", "prepare_resume", "prepare_run", "train_step"]

# Non-finite steps: this many in a row restore the last good state, with the learning rate times
# RECOVERY_LR; after MAX_RECOVERIES restores without a good checkpoint in between, give up.
MAX_BAD_STEPS = 3
RECOVERY_LR = 0.5
MAX_RECOVERIES = 5
# Warn (once a run) of memorisation when this many validations in a row have not improved on the
# best held-out loss while the training loss has gone on falling, by OVERFIT_FALL nats at least,
# below its value at the best (less is the noise between the windows two validations follow: a
# run whose learning rate had all but vanished was told it was memorising on 1.996 -> 1.978).
OVERFIT_PATIENCE = 3
OVERFIT_FALL = 0.05
# The samples shown while training: about this many characters, at this temperature.
SAMPLE_CHARS = 200
SAMPLE_TEMPERATURE = 0.8


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """PyTorch's deterministic algorithms while the compiled step runs: else its compiler sums the
    embedding's gradient with atomic adds from two threads, in whatever order they come, and a run
    is no longer repeated bit for bit by its seed or by its resume. ``warn_only``: an operation with
    no deterministic form (some, on CUDA) warns instead of failing."""
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


class Trainer:
    """One run's model, optimizer, schedule and data, and the loop that trains them.

    Validation runs every ``eval_every`` steps, at every epoch end and at the end; an improvement
    saves ``best``, every validation (and every ``--save-every``) saves ``latest``, and a plateau
    multiplies the learning rate by the run's annealing (``TrainConfig.anneal_for``: 0.5 for the
    classic cells, none for the scan cells). A SIGINT or SIGTERM (through ``stop``) saves
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
        self.autocast = resolve_precision(tc.precision, self.device, tc.optimizer)
        self.model = build_model(run.config, train_ids, self.device)  # the same weights on every rank
        if resume is None and run.parent is not None:  # a fine-tuned run starts from its parent's
            checkpoint.load_weights(self.model, parent_weights(run.parent), run.parent.run)
        self.optimizer = build_optimizer(self.model, tc)
        self.net = distribute(self.model, self.device, ranks, tc.seed)
        # --compile: full windows go through the compiled step (a window of another length, the
        # last of an epoch, through ``net`` itself: a second compilation would cost more than it
        # saves); the weights are the model's, so checkpoints and validation are unchanged
        self.compiled: torch.nn.Module | None = torch.compile(self.net, dynamic=False) if tc.compile else None
        self._compile_tried = False
        self.streams, self.tokens_per_epoch = rank_streams(train_ids, tc.batch_size, ranks)  # (b, L)
        self.steps_per_epoch = count_windows(self.streams, tc.bptt)
        self.val_chars = len(run.heldout_text())
        self.chars_per_token = self.val_chars / max(val_ids.numel(), 1)
        self.state = TrainState(self.model, self.optimizer, self.model.init_hidden(self.batch), ranks)
        self.state.loss_sum = torch.zeros((), device=self.device)
        self.progress = self.state.progress  # restored in place: the same object throughout
        self.resumed_from = None
        if resume is not None:
            self._restore(resume)
            self.resumed_from = self.progress.step
            if ranks.main:  # the logs keep exactly the validations and samples this state has seen
                rundir.truncate_metrics(run, self.progress.validated_at)
                rundir.truncate_metrics(run, self.progress.step, rundir.SAMPLES_FILE)
        self.clock = Clock(tc, self.steps_per_epoch, self.progress.elapsed)
        self._elapsed = self.progress.elapsed  # the ranks' agreed training time (distributed runs)
        self._good = self.state.capture(self.clock.elapsed())  # what a run of non-finite steps goes back to
        self._saved_at = (self.progress.step, self.clock.elapsed())
        self._sampled_at = self.progress.step if resume is not None else -1

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
            if stop in ("interrupted", "terminated", "stopped"):
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
        if tc.max_time is not None and self._agree()[1]:
            return "max_time"  # a run resumed with its time spent: not one step more
        while True:
            if p.window >= self.steps_per_epoch:
                if not self._validate():  # at least once an epoch, however small the corpus
                    continue  # went back to the last good state, maybe mid-epoch
                if tc.epoch_limit is not None and p.epoch >= tc.epoch_limit:
                    return "epochs"
                p.epoch, p.window = p.epoch + 1, 0
                self.state.hidden = self.model.init_hidden(self.batch)
            if tc.max_steps is not None and p.step >= tc.max_steps:
                return "max_steps"
            x, y = window(self.streams, p.window, tc.bptt)  # (T, B) each
            self._step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            if p.step % tc.eval_every == 0:
                self._validate()
            if tc.sample_every and p.step % tc.sample_every == 0:
                self._show_sample()
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
        self._set_schedule()
        compiled = self.compiled is not None and x.size(0) == tc.bptt
        if compiled and not self._compile_tried:
            self.cb.on_status("compiling the training step (a minute the first time, seconds once cached)")
        try:
            with _deterministic() if compiled else contextlib.nullcontext():
                loss, grad_norm, hidden, applied = train_step(
                    self.compiled if compiled else self.net,  # type: ignore[arg-type]
                    self.optimizer,
                    x,
                    y,
                    self.state.hidden,
                    tc.effective_clip,
                    self.autocast,
                    self._agree_bad,
                )
        except Exception as exc:
            if not compiled or self._compile_tried:
                raise
            # the compilation failed (no C++ compiler, an unsupported platform): nothing was
            # updated, since it fails in the forward pass; the run goes on uncompiled
            self.compiled = None
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.cb.on_status(f"torch.compile failed ({type(exc).__name__}: {first}); training uncompiled")
            self._step(x, y)
            return
        self._compile_tried = self._compile_tried or compiled
        p.step, p.window, p.tokens = p.step + 1, p.window + 1, p.tokens + x.numel() * self.ranks.world
        if applied:
            self.state.hidden = detach_hidden(hidden)
            self.state.loss_sum, p.loss_steps = self.state.loss_sum + loss, p.loss_steps + 1
            self.state.grad_norm = grad_norm
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
                f"is in {self.run.path}; try a lower {{lr}} or {{clip}}",
                fields=("lr", "clip"),
            )
        self._restore(self._good)
        p.skipped_steps, p.recoveries = skipped, recoveries
        p.recovery_scale = scale * RECOVERY_LR  # lower each time, or the replay would fail again
        p.bad_in_row = 0
        self.cb.on_status(
            f"{why}: restored the state of step {p.step} and multiplied the learning rate by "
            f"{p.recovery_scale:g}"
        )

    def _set_schedule(self) -> None:
        """Peak LR x plateau annealing x recovery x the final decay of a run whose end is known,
        and, where the config leaves it to the run, the weight decay for the passes it will make
        (:func:`~charlm.config.weight_decay_for`), from the state before the step (so a resumed
        run sets the same values)."""
        p = self.progress
        elapsed = self._elapsed if self.ranks.distributed else None  # the agreed time: the same everywhere
        scale = lr_scale(self.clock.fraction(p.step, elapsed), self.config.decay)
        decay = self.config.weight_decay
        if decay is None:
            decay = weight_decay_for(self.clock.passes(p.step, elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.effective_lr * p.plateau_scale * p.recovery_scale * scale
            group["weight_decay"] = decay

    def _report(self, loss: torch.Tensor) -> None:
        p, clock, nats = self.progress, self.clock, loss.item()
        self.cb.on_step(
            StepReport(
                step=p.step, epoch=p.epoch, epochs=self.config.epoch_limit, tokens=p.tokens, loss=nats,
                bpc=nats / math.log(2) / self.chars_per_token, lr=self.lr,
                grad_norm=float(self.state.grad_norm), clipped=p.clipped_steps / max(p.loss_steps, 1),
                tokens_per_sec=clock.rate(p.tokens), elapsed=clock.elapsed(), fraction=clock.fraction(p.step),
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
            self.model, self.val_ids, self.run.tokenizer.newline_id, autocast=self.autocast, part=part,
            context=self.config.eval_context,
        )  # fmt: skip
        result = score(all_reduce(total, self.ranks).item(), self.val_ids.numel(), self.val_chars)
        loss_sum = all_reduce(self.state.loss_sum.clone(), self.ranks) / self.ranks.world
        if not math.isfinite(result.loss):
            self._recover("the validation loss is not finite")
            return False
        p.validated_at, p.recoveries = p.step, 0
        record = {
            "step": p.step, "epoch": p.epoch, "tokens": p.tokens,
            "train_loss": (loss_sum / max(p.loss_steps, 1)).item(),
            "val_loss": result.loss, "val_ppl": result.perplexity, "val_bpc": result.bpc,
            "lr": self.lr, "weight_decay": float(self.optimizer.param_groups[0]["weight_decay"]),
            "grad_norm": float(self.state.grad_norm),
            "clipped_fraction": p.clipped_steps / max(p.loss_steps, 1), "skipped_steps": p.skipped_steps,
            "tokens_per_sec": p.tokens / max(self.clock.elapsed(), 1e-9), "elapsed": self.clock.elapsed(),
        }  # fmt: skip
        self.state.loss_sum, p.loss_steps, p.clipped_steps = torch.zeros((), device=self.device), 0, 0
        tags = [checkpoint.LATEST]
        if result.loss < p.best_loss:
            p.best_loss, p.best = result.loss, result.to_dict()
            p.stale, p.train_at_best = 0, record["train_loss"]
            tags.insert(0, checkpoint.BEST)
        else:  # validation stopped improving: anneal
            p.plateau_scale *= self.config.anneal_for(self.run.config.model.cell)
            p.stale += 1
            self._warn_overfit(record)
        p.extra = {"val_loss": result.loss, "val_bpc": result.bpc}
        if self.ranks.main:  # first: a resume drops records it has not saved
            rundir.append_metrics(self.run, record)
        self._checkpoint(tags)
        self.cb.on_eval(record)
        if self.config.sample_every is None:
            self._show_sample()
        return True

    def _show_sample(self) -> None:
        """Show what the model writes now (about SAMPLE_CHARS characters at temperature 0.8) and
        log it with its step in ``samples.jsonl``: watching a model learn is how people judge it.
        Rank 0 alone samples, with a generator of its own, so training's random state is untouched."""
        step = self.progress.step
        if not self.ranks.main or step == self._sampled_at:
            return
        self._sampled_at = step
        text = sample_text(self.model, self.run.tokenizer, SAMPLE_CHARS, SAMPLE_TEMPERATURE, seed=step)
        self.model.train()
        record = {"step": step, "text": text, "temperature": SAMPLE_TEMPERATURE, "seed": step}
        rundir.append_metrics(self.run, record, rundir.SAMPLES_FILE)
        getattr(self.cb, "on_sample", lambda step, text: None)(step, text)

    def _warn_overfit(self, record: dict[str, Any]) -> None:
        """Say once, with what to do, when held-out loss has stalled while training loss falls:
        the model is learning the training text by heart rather than the language."""
        p = self.progress
        if p.overfit_warned or p.stale < OVERFIT_PATIENCE or p.train_at_best is None:
            return
        if record["train_loss"] > p.train_at_best - OVERFIT_FALL:
            return
        p.overfit_warned = True
        self.cb.on_status(
            Notice(
                f"warning: held-out loss has not improved for {p.stale} validations (best {p.best_loss:.4f}) "
                f"while training loss fell from {p.train_at_best:.4f} to {record['train_loss']:.4f}: the "
                "model is memorising its corpus. best/ keeps the best checkpoint; for the next run, raise "
                "{dropout} or {weight_decay}, use a smaller model ({hidden}), or train for less time",
                fields=("dropout", "weight_decay", "hidden"),
            )
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
        snapshot = self.state.capture(self.clock.elapsed())
        whole = self.state.gather(snapshot)  # a collective: every rank takes part
        if self.ranks.main:
            for tag in tags:
                checkpoint.save_checkpoint(self.run, tag, whole)
        self._good, self._saved_at = snapshot, (p.step, self.clock.elapsed())
        p.extra.pop("interrupted", None)

    def _restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot`` (see :meth:`TrainState.restore`)."""
        source = f"the checkpoint of step {snapshot.state.get('step')} in {self.run.path}"
        self.state.restore(snapshot, source, self.config.batch_size, self.config.seed)


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
