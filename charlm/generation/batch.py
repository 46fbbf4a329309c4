"""The batched sampler that ``sample``, ``chat``, bulk output and the server share: scores to
text, once.

Every stream is a :class:`Stream`: a :class:`RowDecoder` (its picker, its stream decoder, its
stop strings, its length, the tail of its text) and, while it still reads its prompt through the
steps, the prompt's tokens. A :class:`BatchSampler` holds B streams beside their recurrent states
(:class:`~charlm.generation.rows.Rows`) and alternates two moves:

- :meth:`BatchSampler.pick`: every stream that has read its prompt picks its next token from its
  scores (the unknown token masked) and pushes it through its decoder, which says what text may
  be shown and whether the stream has ended (at a stop string, or at its length);
- :meth:`BatchSampler.advance`: the streams that ended or left drop out of the batch, and the rest
  take one batched recurrent step, with the token just picked or their prompt's next one.

:func:`~charlm.generation.sampling.generate` (``charlm sample``, ``chat``, ``--output``, the
Python API) runs B samples of one prime this way; the server's engine runs every request as a
stream that joins and leaves the same loop between steps. So one seed gives one text through all
of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.data.tokenizer import StreamDecoder, Tokenizer
from charlm.generation.controls import StopMatcher
from charlm.generation.picker import Picker, pick_rows
from charlm.generation.rows import Rows
from charlm.model.network import Hidden

# How much of a stream's text its decoder keeps, for banned strings to be matched across pieces.
TAIL_CHARS = 256


class RowDecoder:
    """One stream's way from a chosen token to its text: its picker (a one-row picker of its own,
    or row ``row`` of a picker that B streams share, as the samples of ``charlm sample
    --num-samples`` share one random generator), the stream decoder, the stop strings, the length
    rule, and the text's last characters where banned strings need them.

    Args:
        config: the sampling controls: ``stop``, ``include_stop`` and ``length`` are used here.
        tail: the text before the first token (the prompt's last characters).
    """

    def __init__(
        self, tokenizer: Tokenizer, config: SampleConfig, picker: Picker, row: int = 0, tail: str = ""
    ) -> None:
        self.picker, self.row = picker, row
        self.length = config.length
        self.tokens = 0  # picked so far, a stop string's included
        self.finish: str | None = None  # "stop" or "length" once it has ended
        self.tail = tail[-TAIL_CHARS:] if picker.ban is not None else ""
        self._decoder = StreamDecoder(tokenizer)
        self._stop = StopMatcher(config.stop, config.include_stop)
        if self.length <= 0:
            self.finish = "length"

    @property
    def stopped(self) -> bool:
        """Whether its text ended at a stop string."""
        return self._stop.done

    def push(self, token: int) -> str:
        """Take the token just picked; return the text that may be shown now (possibly empty).
        When the stream ends here, :attr:`finish` is set and the text returned is its last (what
        was held back included, but never a stop string unless ``include_stop``)."""
        self.tokens += 1
        text = self._decoder.push(token)
        shown = ""
        if text:
            if self.picker.ban is not None:
                self.tail = (self.tail + text)[-TAIL_CHARS:]
            shown = self._stop.push(text)
        if self._stop.done:
            self.finish = "stop"
        elif self.tokens >= self.length:
            shown += self._stop.push(self._decoder.flush()) + self._stop.flush()
            self.finish = "length"
        return shown


def pick_tokens(decoders: Sequence[RowDecoder], logits: np.ndarray) -> np.ndarray:
    """The next token (B,) of B streams from their scores ``logits`` (B, V), each by its own
    decoder's picker: the tokens each picker would give its rows alone. A picker shared by streams
    picks for all its rows at once (one that has left gets zero scores, and its pick is dropped:
    every row's pick depends on its own scores, counts and random number alone, so the others'
    are what they would be with it there); one-row pickers with equal controls draw together
    (:func:`~charlm.generation.picker.pick_rows`)."""
    first = decoders[0].picker
    if first.rows == len(decoders) and all(d.picker is first and d.row == b for b, d in enumerate(decoders)):
        return first(logits, [d.tail for d in decoders] if first.ban is not None else ())  # the batch's
    ids = np.empty(len(decoders), dtype=np.int64)
    shared: dict[int, list[int]] = {}  # by picker: the streams that share it
    single: list[int] = []
    for b, decoder in enumerate(decoders):
        if decoder.picker.rows == 1:
            single.append(b)
        else:
            shared.setdefault(id(decoder.picker), []).append(b)
    for streams in shared.values():
        picker = decoders[streams[0]].picker
        rows = [decoders[b].row for b in streams]
        scores = np.zeros((picker.rows, logits.shape[1]), logits.dtype)  # (rows, V)
        scores[rows] = logits[streams]
        tails = [""] * picker.rows
        for b in streams:
            tails[decoders[b].row] = decoders[b].tail
        ids[streams] = picker(scores, tails if picker.ban is not None else ())[rows]
    if single:
        tails = [decoders[b].tail for b in single]
        ids[single] = pick_rows([decoders[b].picker for b in single], logits[single], tails)
    return ids


@dataclass(eq=False)  # one stream is the same only as itself
class Stream:
    """One stream of a :class:`BatchSampler`: its decoder, and the prompt tokens it still has to
    read through the batched steps before it picks (none where it joined with a read state)."""

    decoder: RowDecoder
    pending: list[int] = field(default_factory=list)
    index: int = 0  # its number among its caller's streams (a sample's number)
    left: bool = False  # set to leave the batch at the next advance (its client has gone)
    token: int = -1  # the token it picked last
    _row: int = field(default=-1, repr=False)  # its row in the batch's Rows


S = TypeVar("S", bound=Stream)


class BatchSampler(Generic[S]):
    """B streams sampled together, one batched recurrent step per token (see the module's doc).

    Args:
        rows: the batch's recurrent states (empty: streams :meth:`join` it).
        unk_id: the tokenizer's unknown token, never picked: no text encodes to it (byte
            fallback), so the model must never say it.
    """

    def __init__(self, rows: Rows, unk_id: int) -> None:
        self.rows, self.unk_id = rows, unk_id
        self.streams: list[S] = []  # in the order of their rows

    def join(
        self,
        streams: Sequence[S],
        hidden: Hidden | None = None,
        logits: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add ``streams`` at the end, all from one state: ``hidden`` and ``logits`` of a read
        text (see :meth:`Rows.join`), or, without them, from nothing, to read their ``pending``
        tokens (a start-of-text newline first) through the steps."""
        self.rows.join(hidden, logits, len(streams))
        for stream in streams:
            stream._row = len(self.streams)
            self.streams.append(stream)

    def pick(self) -> list[tuple[S, str]]:
        """Pick the next token of every stream that has read its prompt (and has neither ended nor
        left), and push it through its decoder: (stream, the text it may show now) for each, in
        order; the ones that ended here have their ``decoder.finish`` set."""
        ready = [s for s in self.streams if not s.pending and not s.left and s.decoder.finish is None]
        if not ready:
            return []
        logits = self.rows.scores  # (B, V), the batch's own: masked in place
        if len(ready) != len(self.streams):
            logits = logits[[s._row for s in ready]]  # (B', V), a copy
        logits[:, self.unk_id] = -math.inf
        ids = pick_tokens([s.decoder for s in ready], logits).tolist()
        out: list[tuple[S, str]] = []
        for stream, token in zip(ready, ids, strict=True):
            stream.token = token
            out.append((stream, stream.decoder.push(token)))
        return out

    def state(self, stream: S) -> tuple[Hidden, np.ndarray]:
        """``stream``'s recurrent state ((layers, 1, S), a pair for the LSTM) and next-token
        scores (V,), as they are now: copies, to keep."""
        return self.rows.hidden(stream._row), self.rows.scores[stream._row].copy()

    def going(self) -> list[S]:
        """The streams that go on at the next :meth:`advance` (not ended, not left)."""
        return [s for s in self.streams if not s.left and s.decoder.finish is None]

    def advance(self, going: Sequence[S] | None = None) -> None:
        """One batched recurrent step of ``going`` (default :meth:`going`), each with the token it
        picked last or, while it reads its prompt, the prompt's next; every other stream leaves."""
        going = self.going() if going is None else list(going)
        if len(going) != len(self.streams):
            self.rows.keep([s._row for s in going])
            for b, stream in enumerate(going):
                stream._row = b
            self.streams = going
        if going:
            tokens = np.array([s.pending.pop(0) if s.pending else s.token for s in going], dtype=np.int64)
            self.rows.step(tokens)

    def __len__(self) -> int:
        return len(self.streams)
