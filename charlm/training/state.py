"""The state of a training run, and the one place that captures and restores it.

A checkpoint is the weights, the optimizer's tensors, the hidden state carried between windows,
the random generator states and :class:`TrainingProgress` (plain data, ``state.json``): everything
the next step depends on, which is what makes resume exact. The trainer's tensors are saved under
plain string keys (``optimizer.I.NAME``, ``hidden.I``, ``rng.cpu[.R]``, ``rng.cuda[.R]``) that
only this module reads and writes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from charlm.errors import CheckpointError
from charlm.model.network import RNNLM, Hidden
from charlm.runs import checkpoint
from charlm.runs.checkpoint import Snapshot
from charlm.training.distributed import Ranks, all_gather


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


@dataclass
class TrainState:
    """Everything a run's next step depends on, live: the model, its optimizer, the hidden state
    carried from the last window (this rank's streams), the progress record, and the training
    loss and gradient norm summed since the last validation (tensors on the device, read once a
    validation so the loop never waits for them)."""

    model: RNNLM
    optimizer: torch.optim.Optimizer
    hidden: Hidden  # (layers, b, H), a pair for the LSTM
    ranks: Ranks
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def capture(self, elapsed: float) -> Snapshot:
        """A deep copy of the state, ``elapsed`` seconds of training into the run."""
        p = self.progress
        p.elapsed, p.loss_sum, p.grad_norm = elapsed, float(self.loss_sum), float(self.grad_norm)
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
        state = {**p.state_dict(), "optimizer": {"param_groups": opt["param_groups"], "state": plain}}
        return Snapshot(weights, trainer, state)

    def gather(self, snapshot: Snapshot) -> Snapshot:
        """This rank's snapshot as a checkpoint of the whole run (a collective): the carried hidden
        state of every rank's streams, (layers, B, H) as one process would hold it, and every
        rank's random generator state (``rng.cpu.R`` for rank R > 0)."""
        if not self.ranks.distributed:
            return snapshot
        trainer = dict(snapshot.trainer)
        for name in [k for k in trainer if k.startswith("hidden.")]:
            trainer[name] = torch.cat(all_gather(trainer[name].to(self.device), self.ranks), 1).cpu()
        for kind in ("cpu", "cuda"):
            if f"rng.{kind}" in trainer:
                states = all_gather(trainer[f"rng.{kind}"].to(self.device), self.ranks)
                trainer.update({f"rng.{kind}.{r}": state.cpu() for r, state in enumerate(states) if r})
        return Snapshot(snapshot.weights, trainer, {**snapshot.state, "ranks": self.ranks.world})

    def restore(self, snapshot: Snapshot, source: str, batch_size: int, seed: int) -> None:
        """Put the model, optimizer, progress, hidden state and random generators back to
        ``snapshot`` (copies: the snapshot stays as it was). ``batch_size`` is the run's global
        batch: a checkpoint of the whole run gives each rank its own streams; a rank the
        checkpoint had no generator state for (resumed with more ranks) reseeds from ``seed``.

        Raises:
            CheckpointError: the snapshot does not fit this run (``source`` names it).
        """
        checkpoint.load_weights(self.model, snapshot.weights, source)
        restored = TrainingProgress.from_state(snapshot.state)
        for f in dataclasses.fields(restored):  # in place: the loop holds this object
            setattr(self.progress, f.name, getattr(restored, f.name))
        t = snapshot.trainer
        try:
            self._restore_optimizer(snapshot)
            n = 2 if isinstance(self.hidden, tuple) else 1
            b = self.hidden[0].size(1) if n == 2 else self.hidden.size(1)  # type: ignore[union-attr]
            hidden = tuple(t[f"hidden.{i}"].clone().to(self.device) for i in range(n))
            r = self.ranks.rank
            whole = self.ranks.distributed and hidden[0].size(1) == batch_size
            if whole:  # a checkpoint of the whole run: this rank's streams
                hidden = tuple(h[:, r * b : (r + 1) * b].contiguous() for h in hidden)
            if any(h.shape[:2] != (self.model.config.layers, b) for h in hidden):
                raise ValueError(f"a hidden state of shape {tuple(hidden[0].shape)}")
            self.hidden = hidden if n == 2 else hidden[0]
            own = not whole or r == 0  # the generator states in the snapshot are this rank's
            if own or f"rng.cpu.{r}" in t:
                torch.set_rng_state(t["rng.cpu" if own else f"rng.cpu.{r}"].clone())
            else:  # resumed with more ranks than the checkpoint had: new dropout masks here
                torch.manual_seed(seed + r + 7919 * self.progress.step)
            cuda = "rng.cuda" if own else f"rng.cuda.{r}"
            if self.device.type == "cuda" and cuda in t:
                torch.cuda.set_rng_state(t[cuda].clone(), self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source} does not fit this run: {exc}") from exc
        self.loss_sum = torch.tensor(self.progress.loss_sum, device=self.device)
        self.grad_norm = torch.tensor(self.progress.grad_norm)

    def _restore_optimizer(self, snapshot: Snapshot) -> None:
        saved = snapshot.state["optimizer"]
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in saved["state"].items()}
        for key, value in snapshot.trainer.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.clone()
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
