"""Sampling text from a trained model: temperature, top-k, top-p (nucleus), a prime text, seeds,
several samples at once, and streaming output one piece at a time.

The loop itself (picking, decoding, stop strings, the length, the batched recurrent step) is
:class:`~charlm.generation.batch.BatchSampler`'s, which the server's engine runs too: here it
runs ``num_samples`` samples of one prime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from charlm.config import SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.generation.batch import TAIL_CHARS, BatchSampler, RowDecoder, Stream
from charlm.generation.picker import Picker, draw, filter_logits, pick_rows
from charlm.generation.rows import Rows, fast_stepper
from charlm.model.network import RNNLM, Hidden

__all__ = [
    "HISTORY_TOKENS", "READ_WINDOW", "TAIL_CHARS", "Context", "Generation", "Picker", "Sample", "draw",
    "filter_logits", "generate", "make_generator", "pick_rows", "read", "sample_all", "sample_text",
]  # fmt: skip

# Tokens read per forward pass when reading a prime: a prime of any length in bounded memory.
READ_WINDOW = 4096
# How much of a prime's tail a started sample keeps: for the penalties' window (and, TAIL_CHARS
# characters, for banned strings).
HISTORY_TOKENS = 1024


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


class Generation:
    """The samples of :func:`generate`: iterate it for (sample number, piece) as each piece becomes
    certain; once it is exhausted, :attr:`tokens` and :attr:`stopped` say how each sample ended.

    The model reads a newline (the start-of-text context it was scored with) and the prime, or the
    prime on from ``start`` (a saved state), when iteration begins; then every sample is a stream
    of one :class:`~charlm.generation.batch.BatchSampler`, all from the prime's state, all drawing
    from one :class:`Picker` (one random generator: the seed's text), stepped together through a
    :class:`~charlm.model.stepper.Stepper` on the CPU, through the module (cuDNN) on a GPU. A
    sample ends at ``config.length`` tokens or at a stop string (see
    :class:`~charlm.generation.controls.StopMatcher`), and leaves the batch then.
    """

    def __init__(
        self,
        model: RNNLM,
        tokenizer: Tokenizer,
        config: SampleConfig,
        generator: torch.Generator,
        start: Context | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.generator, self.start = generator, start
        self.tokens = [0] * config.num_samples  # generated, a stop string's included
        self.stopped = [False] * config.num_samples  # ended at a stop string (else at the length)
        self._pieces = self._run()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early (as a generator's ``close``)."""
        self._pieces.close()

    def _run(self) -> Iterator[tuple[int, str]]:
        # Not under torch.no_grad(): a generator under it enters and leaves it at every piece
        # yielded (8% of a 32-stream sample); what runs the model (read, Rows) takes care of it.
        model, tokenizer, config, start = self.model, self.tokenizer, self.config, self.start
        model.eval()
        n = config.num_samples
        context = read(model, tokenizer, config.prime, start) if config.prime or start is None else start
        picker = Picker(config, self.generator, tokenizer, n, context.history)
        streams = [Stream(RowDecoder(tokenizer, config, picker, i, context.tail), index=i) for i in range(n)]
        sampler = BatchSampler[Stream](Rows(model, fast_stepper(model)), tokenizer.unk_id)
        sampler.join(streams, context.hidden, context.logits)
        while sampler.streams:  # until the last has ended and left
            for stream, piece in sampler.pick():
                if piece:
                    yield stream.index, piece
            sampler.advance()
        for stream in streams:
            self.tokens[stream.index] = stream.decoder.tokens
            self.stopped[stream.index] = stream.decoder.stopped


def generate(
    model: RNNLM,
    tokenizer: Tokenizer,
    config: SampleConfig,
    generator: torch.Generator,
    start: Context | None = None,
) -> Generation:
    """``config.num_samples`` continuations of ``config.prime`` (the prime itself not included), all
    sampled at once: a :class:`Generation`, which yields (sample number, piece) as each piece
    becomes certain, and then holds each sample's token count and whether it ended at a stop
    string."""
    return Generation(model, tokenizer, config, generator, start)


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
        rows = dataclasses.replace(config, num_samples=n, prime="")
        run = generate(model, tokenizer, rows, generator, context)
        for i, piece in run:
            parts[i].append(piece)
        for i in range(n):
            yield Sample(first + i, "".join(parts[i]), run.tokens[i], run.stopped[i])


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
