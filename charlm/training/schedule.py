"""The learning-rate schedule and the run's clock: a linear decay over the end of a run whose end
is known, and the fraction done by whichever stop condition is nearest."""

from __future__ import annotations

import time

from charlm.config import TrainConfig


def lr_scale(fraction: float, decay: float) -> float:
    """Multiplier of the learning rate at ``fraction`` (0..1) of the run: 1, then a linear decay
    to 0 over the last ``decay`` of the run (0: no decay).

    Every run has a known end (epochs, ``--max-steps`` or ``--max-time``), and ending a
    fixed budget at a low learning rate gives a lower loss than stopping at the peak.
    """
    if decay <= 0 or fraction <= 1 - decay:
        return 1.0
    return max(0.0, (1.0 - fraction) / decay)


class Clock:
    """Training time (carried across resumes), throughput since the last report, and the
    fraction of the run done."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int, elapsed: float = 0.0) -> None:
        self.start = time.monotonic() - elapsed
        self.config = config
        limits = [config.max_steps] if config.max_steps else []
        if config.epoch_limit is not None:
            limits.append(config.epoch_limit * steps_per_epoch)
        self.total_steps = max(1, min(limits)) if limits else None  # None: the time ends the run
        self.steps_per_epoch = steps_per_epoch
        self._mark = (time.monotonic(), -1)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, step: int, elapsed: float | None = None) -> float:
        done = step / self.total_steps if self.total_steps else 0.0
        if self.config.max_time:
            done = max(done, (self.elapsed() if elapsed is None else elapsed) / self.config.max_time)
        return min(done, 1.0)

    def passes(self, step: int, elapsed: float | None = None) -> float:
        """The passes over the corpus the run will have made at its end, as far as can be told
        before ``step``: exact where a number of steps or epochs ends it; where its time may end it
        first, the passes so far over the fraction of the run gone (0 before its first step)."""
        if self.total_steps is not None and not self.config.max_time:
            return self.total_steps / self.steps_per_epoch
        fraction = self.fraction(step, elapsed)
        return step / self.steps_per_epoch / fraction if fraction > 0 else 0.0

    def rate(self, tokens: int) -> float:
        now, (then, before) = time.monotonic(), self._mark
        self._mark = (now, tokens)
        return 0.0 if before < 0 else (tokens - before) / max(now - then, 1e-9)
