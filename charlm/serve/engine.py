"""Continuous batching for a recurrent model: every active request is a row of one batched step.

A recurrent model's state is a few kilobytes per stream and does not grow with the text, so one
thread advances every stream at once: each step it picks the next token of every row (each row
with its own sampling controls and random generator, the same code as ``charlm sample``), drops
the rows that have finished or whose client has gone, admits the rows that have arrived, and
advances the rest in one batched recurrent step. A short prompt is read through the same steps,
a token a step, beside the streams being generated. No KV cache, no padding: rows join and leave
at any step.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from charlm.config import Cell, SampleConfig
from charlm.data.tokenizer import StreamDecoder, Tokenizer
from charlm.errors import CharlmError
from charlm.generation.controls import StopMatcher
from charlm.generation.sampling import (
    HISTORY_TOKENS,
    TAIL_CHARS,
    Context,
    Picker,
    make_generator,
    pick_rows,
    read,
)
from charlm.model.network import RNNLM
from charlm.model.stepper import Stepper

# (piece of text or None, finish reason or None): a piece, then once ("", "stop" | "length")
Emit = Callable[[str, str | None], None]


class Sink:
    """Where one choice's text goes: an asyncio queue of (index, piece, finish) in the server's
    event loop. The engine hands a whole step's pieces to each loop at once (one wake-up a step,
    not one a token); called alone, it hands over one piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> None:
        self.loop, self.queue, self.index = loop, queue, index

    def __call__(self, piece: str, finish: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, piece, finish))


def _deliver(items: list[tuple[asyncio.Queue, tuple[int, str, str | None]]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Busy(CharlmError):
    """Every row is taken: the request is refused (HTTP 429), not queued without bound."""


class TooLarge(CharlmError):
    """A request of more streams than the engine ever generates at once (HTTP 400: waiting would
    not help)."""


@dataclass(eq=False)  # one request is one stream: the same only as itself
class Request:
    """One completion: a prompt, how to sample it (``config.length`` is max_tokens), and where its
    text goes. ``emit`` is called from the engine's thread; ``cancelled`` is set by the caller
    when its client has gone, and the row is dropped at the next step."""

    prompt: str
    config: SampleConfig
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0


# A prompt of up to this many tokens is read as rows of the batched steps, one token a step,
# beside the streams being generated (which a prompt read at once by the module would stall for
# its 5 ms set-up; on CUDA, where there are no such rows, it is read at once between steps); a
# longer one is read at once by the module, in a thread of its own beside the steps (a
# 100,000-character prompt read between steps stopped every stream for seconds).
PREFILL_TOKENS = 64
# A prompt of up to this many characters is encoded in the engine's thread to count its tokens
# (tens of microseconds); a longer one is encoded in the prompt thread too.
ENCODE_CHARS = 4096


class _Row:
    """A request being generated: its recurrent state, next-token scores and sampling state.

    A short prompt is not read here: its tokens (after the start-of-text newline) wait in
    ``pending`` and go through the batched steps one a step; its first token is picked from the
    scores after the last of them.
    """

    def __init__(self, request: Request, engine: Engine, prompt: list[int] | None = None) -> None:
        config = request.config
        tokenizer = engine.tokenizer
        self.request = request
        prompt = tokenizer.encode(request.prompt) if prompt is None else prompt
        ids = [tokenizer.newline_id, *prompt]  # start of text, as read() does
        request.prompt_tokens = len(prompt)
        self.pending: list[int] = []
        # Its state and scores are its own until it is first advanced; from then on on the CPU they
        # are row ``slot`` of the engine's batch (see Engine._advance).
        self.last: np.ndarray | None = None  # (1, V)
        self.slot: int | None = None
        if engine.stepper is not None and request.prompt_tokens <= PREFILL_TOKENS:
            self.pending = ids
            self.state = _parts(engine.stepper.zero_state(1))
        else:
            context = engine.read(request.prompt, prompt)
            self.state = engine.to_row_state(context.hidden)
            self.last = context.logits.float().cpu().numpy()[None, :]
        self.picker = Picker(config, make_generator(config.seed), tokenizer, 1, ids[-HISTORY_TOKENS:])
        self.decoder = StreamDecoder(tokenizer)
        self.stop = StopMatcher(config.stop, config.include_stop)
        self.tail = request.prompt[-TAIL_CHARS:]
        self.done = False


class Engine:
    """The batched generation loop of one model, in a thread of its own.

    Args:
        max_rows: requests generated at once (more are refused with :class:`Busy`).
    """

    def __init__(self, network: RNNLM, tokenizer: Tokenizer, max_rows: int = 256) -> None:
        self.network, self.tokenizer, self.max_rows = network.eval(), tokenizer, max_rows
        self.stepper = Stepper(network) if network.device.type == "cpu" else None
        self._rows: list[_Row] = []
        self._arrived: list[Request] = []
        self._reading: list[Request] = []  # long prompts being read in the prompt thread
        self._prompts: ThreadPoolExecutor | None = None
        self._last_read: tuple[str, Context] | None = None  # the prompt read last, and what it gave
        self._lock = threading.Condition()
        self._running = False
        self._draining = False  # drain() asked; the engine's thread ends the streams
        self._thread: threading.Thread | None = None
        self._out: dict[asyncio.AbstractEventLoop, list] = {}  # this step's pieces, by event loop
        # On the CPU, the state (flat: see _parts) and scores of the rows of the last step, in order
        self._batch: list[np.ndarray] = []
        self._logits = np.zeros((0, 0), np.float32)
        self.steps = 0

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._arrived) + self._still_reading()

    def _still_reading(self) -> int:
        """Prompts being read whose clients are still there (one gone frees its place at once)."""
        return sum(not request.cancelled.is_set() for request in self._reading)

    def submit(self, requests: list[Request]) -> None:
        """Queue ``requests`` (a request's ``n`` choices together, all or none).

        Raises:
            TooLarge: they are more than ``max_rows``. Busy: they would exceed it now.
        """
        if len(requests) > self.max_rows:
            raise TooLarge(f"this request asks for {len(requests)} streams (prompts x n); this server "
                           f"generates at most {self.max_rows} at once")  # fmt: skip
        with self._lock:
            if len(self._rows) + len(self._arrived) + self._still_reading() + len(requests) > self.max_rows:
                raise Busy(f"the server is generating {self.max_rows} streams at once; try again shortly")
            self._arrived.extend(requests)
            self._lock.notify()

    def start(self) -> None:
        self._running = True
        self._prompts = ThreadPoolExecutor(1, thread_name_prefix="charlm-prompts")
        self._thread = threading.Thread(target=self._loop, name="charlm-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """End every stream now (shutting down): each gets its last piece and a finish reason.

        The engine's thread does it, before its next step: done here, a row that finishes in the
        step under way would be given a second finish (and a request of n choices could then end
        before its last choice's text)."""
        with self._lock:
            self._draining = True
            self._lock.notify()
        if self._thread is None or not self._thread.is_alive():
            self._end_all()

    def _end_all(self) -> None:
        with self._lock:
            rows, arrived = self._rows, self._arrived + self._reading
            self._rows, self._arrived, self._reading, self._draining = [], [], [], False
        for row in rows:
            row.request.emit("", "stop")
        for request in arrived:  # a prompt still being read is dropped when read (see _admit)
            request.emit("", "stop")

    def stop(self) -> None:
        self.drain()
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._prompts is not None:
            self._prompts.shutdown(wait=False, cancel_futures=True)

    def read(self, prompt: str, ids: list[int]) -> Context:
        """The model's context after ``prompt`` (its tokens ``ids``): read at once by the module,
        or the last read's again where it is the same text, since a request of n choices, or the
        same prompt sent again, is n rows of one text (a 100,000-character prompt with n=16 was
        read 16 times). Rows copy what they take from it: it is never changed."""
        last = self._last_read
        if last is not None and last[0] == prompt:
            return last[1]
        context = read(self.network, self.tokenizer, prompt, ids=ids)
        self._last_read = (prompt, context)
        return context

    def to_row_state(self, hidden: torch.Tensor | tuple[torch.Tensor, ...]) -> list:
        """A row's state from the model's (layers, 1, H) hidden state: the stepper's layout on the
        CPU, the tensors themselves elsewhere."""
        if self.stepper is not None:
            return _parts(self.stepper.state_from(hidden))
        return list(hidden) if isinstance(hidden, tuple) else [hidden]

    def _loop(self) -> None:
        """Step until stopped; a failure of a step ends the streams it held, not the engine."""
        while self._running:
            try:
                self._work()
            except Exception as exc:  # the engine must outlive any one request
                with self._lock:
                    rows, self._rows = self._rows, []
                self._out = {}  # a finish held back here would be a row's second
                for row in rows:
                    row.request.emit("", f"error: {exc}")

    @torch.no_grad()
    def _work(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._rows and not self._arrived and not self._draining:
                    self._lock.wait()
                if self._draining:  # first: stop() drains, then ends the thread
                    arrived = None
                elif not self._running:
                    return
                else:
                    arrived, self._arrived = self._arrived, []
            if arrived is None:
                self._end_all()
                continue
            for request in arrived:
                # A short prompt's row is made here (its tokens are read in the steps, or on CUDA
                # at once); a longer one's in the prompt thread, which reads it at once with the
                # module while the steps go on.
                prompt = self._short(request.prompt)
                if prompt is not None:
                    self._admit(request, prompt)
                else:
                    with self._lock:
                        self._reading.append(request)
                    assert self._prompts is not None
                    self._prompts.submit(self._admit_read, request)
            with self._lock:
                rows = list(self._rows)
            if rows:
                self._step(rows)

    def _short(self, text: str) -> list[int] | None:
        """``text``'s tokens where they are few enough to read in the steps, else None."""
        if len(text) > ENCODE_CHARS:
            return None
        try:
            ids = self.tokenizer.encode(text)
        except Exception:  # let the prompt thread meet it and say so
            return None
        return ids if len(ids) <= PREFILL_TOKENS else None

    def _admit(self, request: Request, prompt: list[int] | None = None) -> None:
        """Make ``request``'s row (from its tokens, where they are known) and add it to the next step."""
        try:
            row = _Row(request, self, prompt)
        except Exception as exc:  # a request's failure is its own, never the engine's
            request.emit("", f"error: {exc}")
            return
        with self._lock:
            if not request.cancelled.is_set():
                self._rows.append(row)
                self._lock.notify()

    def _admit_read(self, request: Request) -> None:
        """:meth:`_admit` in the prompt thread: a request ended meanwhile (shutdown: it has had its
        finish; its client gone) is dropped, before its read where it can be."""
        row: _Row | Exception | None = None
        with self._lock:
            ended = request not in self._reading or request.cancelled.is_set()
        if not ended:
            try:
                row = _Row(request, self)
            except Exception as exc:  # whatever it is, the request must hear of it and leave
                row = exc
        with self._lock:
            if request not in self._reading:  # ended by drain(): it has had its finish
                return
            self._reading.remove(request)
            if request.cancelled.is_set():
                return
            if isinstance(row, _Row):
                self._rows.append(row)
                self._lock.notify()
        if isinstance(row, Exception):
            request.emit("", f"error: {row}")

    def _send(self, request: Request, piece: str, finish: str | None) -> None:
        """Emit now, or, for a :class:`Sink`, with the rest of this step's pieces (see _flush)."""
        sink = request.emit
        if isinstance(sink, Sink):
            self._out.setdefault(sink.loop, []).append((sink.queue, (sink.index, piece, finish)))
        else:
            sink(piece, finish)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        for loop, items in out.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _step(self, rows: list[_Row]) -> None:
        """Pick a token for every row that has read its prompt, emit its text, drop finished rows,
        advance the rest (and the prompts still being read) in one batched step."""
        going: list[tuple[_Row, int]] = []
        reading = [row for row in rows if row.pending]
        picking = [row for row in rows if not row.pending]
        ids: list[int] = []
        if picking:
            logits = self._scores(picking)  # (B, V), a copy
            logits[:, self.tokenizer.unk_id] = -math.inf  # no text encodes to it (byte fallback)
            tails = [row.tail for row in picking] if any(row.picker.ban for row in picking) else []
            ids = pick_rows([row.picker for row in picking], logits, tails)
        for row, token in zip(picking, ids, strict=True):
            request = row.request
            if request.cancelled.is_set():
                row.done = True
                continue
            request.completion_tokens += 1
            text = row.decoder.push(int(token))
            if text:
                row.tail = (row.tail + text)[-TAIL_CHARS:]
                shown = row.stop.push(text)
                if shown:
                    self._send(request, shown, None)
            if row.stop.done:
                self._send(request, "", "stop")
                row.done = True
            elif request.completion_tokens >= request.config.length:
                rest = row.stop.push(row.decoder.flush()) + row.stop.flush()
                if rest:
                    self._send(request, rest, None)
                self._send(request, "", "length")
                row.done = True
            else:
                going.append((row, int(token)))
        for row in reading:
            if row.request.cancelled.is_set():
                row.done = True
            else:
                going.append((row, row.pending.pop(0)))
        self._flush()
        with self._lock:
            self._rows = [r for r in self._rows if not r.done]
        if going:
            self._advance(going)
        self.steps += 1

    def _scores(self, rows: list[_Row]) -> np.ndarray:
        """The next-token scores (B, V) of ``rows``, a new array."""
        if all(row.slot is not None for row in rows):  # (slots are the CPU's alone)
            return self._logits[[row.slot for row in rows]]
        return np.concatenate([self._logits[row.slot : row.slot + 1] if row.slot is not None else row.last
                               for row in rows])  # fmt: skip

    def _advance(self, going: list[tuple[_Row, int]]) -> None:
        """One batched recurrent step of the rows that go on, with the tokens just picked."""
        rows = [row for row, _ in going]
        tokens = np.array([token for _, token in going])
        if self.stepper is not None:
            # The state of the rows as one batch: last step's arrays as they are while the same
            # rows go on in the same order (most steps), else gathered row by row.
            slots = [row.slot for row in rows]
            if slots != list(range(len(self._batch[0]) if self._batch else 0)):
                state = [
                    np.concatenate([part[r.slot : r.slot + 1] if r.slot is not None else r.state[j]
                                    for r in rows])
                    for j, part in enumerate(self._batch or rows[0].state)
                ]  # fmt: skip
            else:
                state = self._batch
            logits, new = self.stepper.step(tokens, _nested(state, self.stepper))  # (B, V)
            self._batch, self._logits = _parts(new), logits
            for b, row in enumerate(rows):
                row.slot, row.state, row.last = b, [], None
            return
        device = self.network.device
        hidden = [torch.cat([r.state[j] for r in rows], 1) for j in range(len(rows[0].state))]
        state = tuple(hidden) if len(hidden) == 2 else hidden[0]
        out, new_state = self.network(torch.from_numpy(tokens).to(device).view(1, -1), state)  # (1, B, V)
        parts = list(new_state) if isinstance(new_state, tuple) else [new_state]
        scores = out[0].float().cpu().numpy()
        for b, row in enumerate(rows):
            row.state = [p[:, b : b + 1] for p in parts]
            row.last = scores[b : b + 1]


def _parts(state: list) -> list[np.ndarray]:
    """A :class:`Stepper` state as a flat list of (B, H) arrays: h, c of each layer (LSTM), or h."""
    return [a for layer in state for a in (layer if isinstance(layer, tuple) else (layer,))]


def _nested(parts: list[np.ndarray], stepper: Stepper) -> list:
    """:func:`_parts` undone."""
    if stepper.cell is Cell.lstm:
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(stepper.layers)]
    return list(parts)
