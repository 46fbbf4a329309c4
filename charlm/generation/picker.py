"""Choosing the next token from a model's scores: temperature, top-k, top-p (nucleus), min-p,
penalties and banned text (see :mod:`charlm.generation.controls`), with one random generator per
picker so that a seed gives the same text wherever the picker runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.generation.controls import BanFilter, Penalties, min_p_filter


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` most likely tokens and, of those, all but the smallest
    set whose probability reaches ``top_p``, along the last dimension of ``logits`` (..., V);
    0 and 1 switch a filter off."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


class Picker:
    """Chooses the next token of each of B streams from their logits, by ``config``: penalties,
    banned text, temperature, top-k, top-p and min-p (see :mod:`charlm.generation.controls`).

    Sampling inverts the cumulative distribution with one uniform number per row, in float64 so a
    token of probability 0 is never hit: the draw ``torch.multinomial`` makes, done in NumPy with
    the uniform numbers drawn from ``generator`` a block at a time, since one token at a time
    pays per-call costs that dwarf the arithmetic (V is a few hundred).

    Args:
        tokenizer: needed for ``config.ban`` (the tokens' texts).
        rows: B, for the penalties' counts and the random numbers of a step.
        history: the tokens before the first pick (the prime), which the penalties count.
    """

    _BLOCK = 4096  # uniform numbers drawn at once: 4096 steps of one stream, fewer of many

    def __init__(
        self,
        config: SampleConfig,
        generator: torch.Generator,
        tokenizer: Tokenizer | None = None,
        rows: int = 1,
        history: Sequence[int] = (),
    ) -> None:
        self.config, self.generator, self.rows = config, generator, rows
        self._uniform = np.empty((0, 0))
        self._used = 0
        self.penalties: Penalties | None = None
        if config.repetition_penalty != 1 or config.presence_penalty or config.frequency_penalty:
            self.penalties = Penalties(
                rows, tokenizer.vocab_size if tokenizer else 0, config.penalty_window,
                config.repetition_penalty, config.presence_penalty, config.frequency_penalty, history,
            )  # fmt: skip
        self.ban = BanFilter(tokenizer, config.ban) if config.ban and tokenizer is not None else None

    def __call__(self, logits: torch.Tensor | np.ndarray, tails: Sequence[str] = ()) -> np.ndarray:
        """Token ids (B,) for ``logits`` (B, V); ``tails`` are the rows' texts so far (their last
        characters), which banned strings are matched against."""
        config = self.config
        x = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
        if self.penalties is not None:
            x = self.penalties.apply(x.astype(np.float64))
        if self.ban is not None:
            x = self.ban.apply(x, tails)
        ids = x.argmax(axis=-1) if config.temperature == 0 else self._draw(x)
        if self.penalties is not None:
            self.penalties.push(ids)
        return ids

    def _draw(self, x: np.ndarray) -> np.ndarray:
        """Sample from ``x`` (B, V) at the temperature, through the filters."""
        return draw(x, self.config, self._next(x.shape[0]))

    @property
    def alone(self) -> bool:
        """Whether its picks depend on nothing but the logits and its random numbers (no penalties,
        no banned strings): such pickers with the same controls can draw together (:func:`pick_rows`)."""
        return self.penalties is None and self.ban is None

    def _next(self, streams: int) -> np.ndarray:
        """The next B uniform numbers in [0, 1)."""
        if self._used >= self._uniform.shape[0] or self._uniform.shape[1] != streams:
            rows = max(1, self._BLOCK // streams)
            block = torch.rand((rows, streams), generator=self.generator, dtype=torch.float64)
            self._uniform, self._used = block.numpy(), 0
        self._used += 1
        return self._uniform[self._used - 1]


def draw(x: np.ndarray, config: SampleConfig, uniform: np.ndarray) -> np.ndarray:
    """Token ids (B,) drawn from logits ``x`` (B, V) at ``config``'s temperature, through its top-k,
    top-p and min-p filters, with one uniform number in [0, 1) per row (B,). Each row's id depends
    on that row alone, so rows of different streams may be drawn together."""
    x = x.astype(np.float64) / config.temperature
    if config.top_k > 0 or config.top_p < 1:
        x = filter_logits(torch.from_numpy(x), config.top_k, config.top_p).numpy()
    x = min_p_filter(x, config.min_p)
    cdf = np.cumsum(np.exp(x - x.max(axis=-1, keepdims=True)), axis=-1)  # unnormalised, (B, V)
    u = uniform[:, None] * cdf[:, -1:]  # (B, 1)
    ids = (cdf <= u).sum(axis=-1)  # the first index whose cdf exceeds u (cdf never decreases)
    # u rounded up to the total (about one draw in 2**53): the most likely, never a masked one
    return np.where(ids < x.shape[1], ids, x.argmax(axis=-1))


def pick_rows(pickers: Sequence[Picker], logits: np.ndarray, tails: Sequence[str]) -> np.ndarray:
    """The next token (B,) of B streams, each with a one-row :class:`Picker` of its own, from their
    logits (B, V) and texts so far: the same ids as calling each picker on its row, but the
    pickers that are :attr:`~Picker.alone` with equal controls draw in one vectorised call (a
    server's many streams cost a few array operations a step, not a few per stream)."""
    ids = np.empty(len(pickers), dtype=np.int64)
    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for b, picker in enumerate(pickers):
        c = picker.config
        if picker.alone and c.temperature > 0:
            groups.setdefault((c.temperature, c.top_k, c.top_p, c.min_p), []).append(b)
        else:
            ids[b] = picker(logits[b : b + 1], tails[b : b + 1])[0]
    for rows in groups.values():
        uniform = np.array([pickers[b]._next(1)[0] for b in rows])  # (G,): each stream's own draw
        ids[rows] = draw(logits[rows], pickers[rows[0]].config, uniform)
    return ids
