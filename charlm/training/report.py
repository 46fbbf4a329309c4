"""What the training loop tells its caller, and what it returns: it knows nothing of the terminal,
so the CLI renders these, a notebook prints them and tests record them (the minGPT way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from charlm.model.scoring import EvalResult


@dataclass(frozen=True)
class StepReport:
    """Where training stands, sent to :meth:`Callbacks.on_step` every few steps."""

    step: int
    epoch: int  # 1-based
    epochs: int | None  # None: no limit (a step count or a time ends the run)
    tokens: int
    loss: float  # training loss (nats/token) of the latest step
    bpc: float  # the same loss in bits per character (of the held-out text's characters per token)
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
    def on_sample(self, step: int, text: str) -> None: ...


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

    def on_sample(self, step: int, text: str) -> None:
        """Ignore."""


@dataclass(frozen=True)
class TrainResult:
    """How a run ended."""

    run_dir: Path
    steps: int
    tokens: int
    elapsed: float
    stop_reason: str  # "epochs", "max_steps", "max_time", "interrupted" (SIGINT), "terminated"
    # (SIGTERM) or "stopped" (the caller's stop event)
    best: EvalResult | None
    parameters: int
    skipped_steps: int = 0
