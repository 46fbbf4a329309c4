"""Sampling text from a trained model: temperature, top-k, top-p (nucleus), a prime text, seeds,
several samples at once, and streaming output one piece at a time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.data.tokenizer import StreamDecoder, Tokenizer
from charlm.generation.controls import BanFilter, Penalties, StopMatcher, min_p_filter
from charlm.model.network import RNNLM, Hidden
from charlm.model.stepper import Stepper


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
        rows: B, for the penalties' counts.
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
        self.config, self.generator = config, generator
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


# Tokens read per forward pass when reading a prime: a prime of any length in bounded memory.
READ_WINDOW = 4096
# How much of a prime's tail a started sample keeps: for the penalties' window and banned strings.
HISTORY_TOKENS = 1024
TAIL_CHARS = 256


@dataclass
class Context:
    """What a model knows after reading a text: the recurrent state and the scores of the next
    token, plus the text's last tokens and characters (which penalties and bans look back on).
    It is all a sample needs to start from, which is what a state file saves."""

    hidden: Hidden  # (layers, 1, H), a pair for the LSTM
    logits: torch.Tensor  # (V,) of the next token
    history: list[int]  # the last HISTORY_TOKENS tokens read
    tail: str  # the last TAIL_CHARS characters read
    tokens: int = 0  # tokens of text read to reach it (the start-of-text newline not counted)


@torch.no_grad()
def read(
    model: RNNLM, tokenizer: Tokenizer, text: str, start: Context | None = None, ids: list[int] | None = None
) -> Context:
    """Read ``text`` from a start-of-text context (a newline, as the model was scored), or on from
    ``start``, ``READ_WINDOW`` tokens per pass: any length in bounded memory. ``ids``: the text's
    token ids, where the caller has already encoded it."""
    model.eval()
    ids = tokenizer.encode(text) if ids is None else ids
    read_tokens = len(ids) + (start.tokens if start is not None else 0)
    if start is None:
        ids = [tokenizer.newline_id, *ids]
    hidden = start.hidden if start is not None else None
    logits = start.logits if start is not None else None
    for i in range(0, len(ids), READ_WINDOW):
        chunk = torch.tensor(ids[i : i + READ_WINDOW], device=model.device).view(-1, 1)  # (w, 1)
        output, hidden = model.features(chunk, hidden)  # (w, 1, H)
        logits = model.logits(output[-1, 0]).float()  # (V,): the next token's, after the window
    assert hidden is not None and logits is not None
    history = ((start.history if start else []) + ids)[-HISTORY_TOKENS:]
    tail = ((start.tail if start else "") + text)[-TAIL_CHARS:]
    return Context(hidden, logits, history, tail, read_tokens)


@torch.no_grad()
def generate(
    model: RNNLM,
    tokenizer: Tokenizer,
    config: SampleConfig,
    generator: torch.Generator,
    start: Context | None = None,
    tokens: list[int] | None = None,
    stopped: list[bool] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (sample number, piece) for ``config.num_samples`` continuations of ``config.prime``
    (the prime itself not included), all sampled at once, as each piece becomes certain. When
    given, ``tokens`` and ``stopped`` (lists of ``num_samples``) receive each sample's token count
    and whether it ended at a stop string.

    The model reads a newline (the start-of-text context it was scored with) and the prime, or the
    prime on from ``start`` (a saved state), then feeds back the tokens it picks, one row per
    sample: through a :class:`Stepper` on the CPU, through the module (cuDNN) on a GPU. A sample
    ends at ``config.length`` tokens or at a stop string (see :class:`StopMatcher`).
    """
    model.eval()
    device = model.device
    n = config.num_samples
    context = read(model, tokenizer, config.prime, start) if config.prime or start is None else start
    # every sample starts from the prime's state: (layers, n, H)
    hidden = context.hidden
    hidden = tuple(h.repeat(1, n, 1) for h in hidden) if isinstance(hidden, tuple) else hidden.repeat(1, n, 1)
    last = context.logits.to(device).unsqueeze(0).repeat(n, 1)  # (n, V)
    decoders = [StreamDecoder(tokenizer) for _ in range(n)]
    stops = [StopMatcher(config.stop, config.include_stop) for _ in range(n)]
    picker = Picker(config, generator, tokenizer, n, context.history)
    tails = [context.tail] * n if picker.ban is not None else []
    stepper = Stepper(model) if device.type == "cpu" else None
    state = stepper.state_from(hidden) if stepper else hidden
    for _ in range(config.length):
        # No text encodes to the unknown piece (byte fallback), so the model must never say it.
        last[:, tokenizer.unk_id] = -math.inf
        ids = picker(last, tails)  # (n,)
        for i, next_id in enumerate(ids.tolist()):
            if stops[i].done:
                continue
            if tokens is not None:
                tokens[i] += 1
            text = decoders[i].push(next_id)
            if text:
                if tails:
                    tails[i] = (tails[i] + text)[-TAIL_CHARS:]
                shown = stops[i].push(text)
                if shown:
                    yield i, shown
        if config.stop and all(s.done for s in stops):
            break
        if stepper is not None:
            last, state = stepper.step(ids, state)  # (n, V), NumPy
        else:
            logits, state = model(torch.from_numpy(ids).to(device).view(1, n), state)  # (1, n, V)
            last = logits[0]
    for i, decoder in enumerate(decoders):
        tail = stops[i].push(decoder.flush()) + stops[i].flush()
        if stopped is not None:
            stopped[i] = stops[i].done
        if tail:
            yield i, tail


@dataclass(frozen=True)
class Sample:
    """One finished sample of :func:`sample_all`."""

    index: int
    text: str  # the continuation (the prime not included)
    tokens: int  # generated, the stop string's included
    stopped: bool  # ended at a stop string (else at the length)


def sample_all(
    model: RNNLM,
    tokenizer: Tokenizer,
    config: SampleConfig,
    generator: torch.Generator,
    start: Context | None = None,
    batch: int = 64,
) -> Iterator[Sample]:
    """``config.num_samples`` samples, drawn ``batch`` at a time (one batched step advances them
    all, so a thousand samples cost a small multiple of one), yielded in order as each batch ends."""
    context = read(model, tokenizer, config.prime, start) if config.prime or start is None else start
    for first in range(0, config.num_samples, batch):
        n = min(batch, config.num_samples - first)
        parts: list[list[str]] = [[] for _ in range(n)]
        tokens, stopped = [0] * n, [False] * n
        rows = dataclasses.replace(config, num_samples=n, prime="")
        for i, piece in generate(model, tokenizer, rows, generator, context, tokens, stopped):
            parts[i].append(piece)
        for i in range(n):
            yield Sample(first + i, "".join(parts[i]), tokens[i], stopped[i])


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator: seeded for reproducible text, else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_text(model: RNNLM, tokenizer: Tokenizer, characters: int, temperature: float, seed: int) -> str:
    """About ``characters`` characters of text from the start-of-text context (a sample's first
    ``characters``: at most that many tokens are drawn, and the text is cut there)."""
    config = SampleConfig(length=characters, temperature=temperature, seed=seed)
    pieces: list[str] = []
    for _, piece in generate(model, tokenizer, config, make_generator(seed)):
        pieces.append(piece)
        if sum(map(len, pieces)) >= characters:
            break
    return "".join(pieces)[:characters]
