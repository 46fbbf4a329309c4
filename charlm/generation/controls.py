"""Sampling controls beyond temperature, top-k and top-p, each a small object the sampler applies
to B rows of logits (or of text) per step, so one code path serves one sample and a batch:

- :class:`Penalties`: repetition (CTRL, Keskar et al. 2019: a seen token's positive logit divided
  by the penalty, a negative one multiplied), presence (minus a constant once a token was seen) and
  frequency (minus a constant per occurrence), over each row's last ``window`` tokens, the prime's
  included (llama.cpp's and RWKV's reading);
- :func:`min_p_filter`: min-p (Nguyen et al. 2024): drop tokens less likely than ``min_p`` times
  the likeliest, a cut that follows the model's confidence;
- :class:`BanFilter`: text that is never produced, matched on text across token boundaries;
- :class:`StopMatcher`: a row ends when its text ends with a stop string, matched on text across
  token boundaries, and the stop string is held back from the stream until it is certain.

The order per step is: penalties on the raw logits, ban, temperature, top-k, top-p, min-p (as
Hugging Face's warpers; llama.cpp's default order differs only in putting temperature last).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from charlm.data.tokenizer import Tokenizer


class Penalties:
    """Per-row token counts over a sliding window, and the penalties they imply.

    Args:
        rows: B, the streams sampled at once.
        vocab: V.
        window: how many of each row's latest tokens count (the prime's included).
        history: each row's tokens so far (the prime), oldest first; only the last ``window`` count.
    """

    def __init__(
        self,
        rows: int,
        vocab: int,
        window: int,
        repetition: float = 1.0,
        presence: float = 0.0,
        frequency: float = 0.0,
        history: Sequence[int] = (),
    ) -> None:
        self.repetition, self.presence, self.frequency = repetition, presence, frequency
        self.window = window
        self.counts = np.zeros((rows, vocab), dtype=np.int32)  # (B, V)
        self._ring = np.full((rows, window), -1, dtype=np.int64)  # (B, W): the last tokens, -1 empty
        self._at = 0
        for token in list(history)[-window:]:
            self.push(np.full(rows, token, dtype=np.int64))

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def push(self, ids: np.ndarray) -> None:
        """Count the tokens ``ids`` (B,) just chosen, forgetting each row's oldest beyond the window."""
        rows = np.arange(ids.shape[0])
        old = self._ring[:, self._at]  # (B,)
        gone = old >= 0
        self.counts[rows[gone], old[gone]] -= 1
        self.counts[rows, ids] += 1
        self._ring[:, self._at] = ids
        self._at = (self._at + 1) % self.window

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (B, V), penalised (a new array)."""
        seen = self.counts > 0  # (B, V)
        out = logits
        if self.repetition != 1.0:
            penalised = np.where(logits > 0, logits / self.repetition, logits * self.repetition)
            out = np.where(seen, penalised, logits)
        if self.presence:
            out = out - self.presence * seen
        if self.frequency:
            out = out - self.frequency * self.counts
        return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Mask (to -inf) the tokens of ``logits`` (B, V) whose probability is below ``min_p`` times
    that of the row's likeliest: p_i / p_max = exp(l_i - l_max), so the cut is on logits."""
    if min_p <= 0:
        return logits
    cut = logits.max(axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return np.where(logits < cut, -np.inf, logits)


class BanFilter:
    """Keeps the strings ``bans`` out of the text, whatever tokens would spell them.

    A token may complete a banned string ``b`` only in two ways: its own text contains ``b``, or
    the row's text ends with ``b[:i]`` and the token's text starts with ``b[i:]`` (0 < i < len(b)).
    Both are masks over the vocabulary built once, so a step costs a few ``endswith`` per row.
    Checked token by token, a banned string can never be completed, however it is split. Byte-
    fallback tokens (parts of characters the tokenizer never saw) have no text and are not matched.
    """

    def __init__(self, tokenizer: Tokenizer, bans: Sequence[str]) -> None:
        self.bans = [b for b in bans if b]
        byte = tokenizer.byte_values()
        texts = ["" if byte[i] is not None else tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        self.always = np.zeros(len(texts), dtype=bool)  # (V,): tokens whose own text holds a banned string
        self.after: list[tuple[str, np.ndarray]] = []  # (text before, tokens that would finish it)
        for b in self.bans:
            self.always |= np.array([b in t for t in texts])
            for i in range(1, len(b)):
                rest = b[i:]
                mask = np.array([bool(t) and t.startswith(rest) for t in texts])
                if mask.any():
                    self.after.append((b[:i], mask))
        self.longest = max((len(b) for b in self.bans), default=0)

    @property
    def active(self) -> bool:
        return bool(self.bans)

    def apply(self, logits: np.ndarray, tails: Sequence[str]) -> np.ndarray:
        """``logits`` (B, V) with the tokens masked that would complete a banned string after each
        row's text, ``tails[b]`` (its last characters suffice). A row with nothing left unmasked
        keeps its logits (no token could be chosen otherwise)."""
        masks = np.broadcast_to(self.always, logits.shape).copy()  # (B, V)
        for row, tail in enumerate(tails):
            for before, mask in self.after:
                if tail.endswith(before):
                    masks[row] |= mask
        stuck = masks.all(axis=-1)
        masks[stuck] = False
        return np.where(masks, -np.inf, logits)


class StopMatcher:
    """Ends one row's generated text where it first ends with a stop string (of the stop strings
    it ends with there, the longest is the one not shown), and holds back the text that may be
    the start of one until it is certain (so a stop string is never half streamed).

    ``push`` takes each new piece of text and returns what may be shown now; once a stop string has
    appeared, ``done`` is set and the text before it (and the stop string, with ``include``) is the
    last that ``push`` returns.
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self.done = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.done:
            return ""
        if not self.stops:
            return text
        held = self._held + text
        found = [(held.find(s) + len(s), -len(s), s) for s in self.stops if s in held]
        if found:  # the text ended with a stop string first where the earliest one ends
            end, _, stop = min(found)  # of those ending there, the longest
            self.done, self._held = True, ""
            return held[:end] if self.include else held[: end - len(stop)]
        keep = max((j for s in self.stops for j in range(1, len(s)) if held.endswith(s[:j])), default=0)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The text held back when the sample ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.done else held
