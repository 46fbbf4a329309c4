"""Continuous batching for a recurrent model: every active request is a row of one batched step.

A recurrent model's state is a few kilobytes per stream and does not grow with the text, so one
thread advances every stream at once: every request is a stream of one
:class:`~charlm.generation.batch.BatchSampler`, the loop ``charlm sample`` runs (each stream with
its own sampling controls and random generator), which picks the next token of every row, drops
the rows that have finished or whose client has gone, and advances the rest in one batched
recurrent step; between steps the engine admits the rows that have arrived. A short prompt is read
through the same steps, a token a step, beside the streams being generated. No KV cache, no
padding: rows join and leave at any step. The engine itself is admission, its thread, and the
delivery of each step's pieces to the server's event loops.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from charlm.data.tokenizer import Tokenizer
from charlm.generation.batch import TAIL_CHARS, BatchSampler, RowDecoder, Stream
from charlm.generation.rows import Rows, fast_stepper
from charlm.generation.sampling import HISTORY_TOKENS, Context, Picker, make_generator, read
from charlm.model.network import RNNLM
from charlm.serve.cache import Entry, StateCache
from charlm.serve.streams import (
    CACHE_BYTES,
    Busy,
    Emit,
    Generates,
    Pieces,
    Request,
    Sink,
    TooLarge,
    make_room,
)

__all__ = ["CACHE_BYTES", "Busy", "Emit", "Engine", "Generates", "Request", "Sink", "TooLarge"]

# A prompt of up to this many tokens is read as rows of the batched steps, one token a step,
# beside the streams being generated (which a prompt read at once by the module would stall for
# its 5 ms set-up; on CUDA, where there are no such rows, it is read at once between steps); a
# longer one is read at once by the module, in a thread of its own beside the steps (a
# 100,000-character prompt read between steps stopped every stream for seconds).
PREFILL_TOKENS = 64
# A step of up to this many rows runs on one thread of arithmetic in the engine's thread, unless
# the engine is told it has the process's arithmetic to itself (``threads``): GNU OpenMP spins
# only briefly for work when more threads than cores belong to its teams, so where another thread
# (the main one, which loaded the model) has a team of its own, oneDNN's products on two threads
# ran small batches at half the speed of one (docs/benchmarks/serve-load.md).
ONE_THREAD_ROWS = 48
# A prompt of up to this many characters is encoded in the engine's thread to count its tokens
# (tens of microseconds); a longer one is encoded in the prompt thread too.
ENCODE_CHARS = 4096


# A prompt's tokens (the start-of-text newline not included) and the kept state that read a
# prefix of them (the newline included), or None.
_Found = tuple[list[int], Entry | None]


def _kept_tokens(kept: Entry | None) -> int:
    return kept.tokens if kept is not None else 0


class _Row(Stream):
    """A request being generated: a stream of the engine's sampler, and, until the engine's thread
    adds it to the batch, the state it starts from.

    A prompt is looked up in the engine's cache of states first: where a kept state read a prefix
    of its tokens, the row starts from it and reads only the rest. A short rest is not read here:
    its tokens wait in ``pending`` and go through the batched steps one a step (from a model that
    has read nothing, the start-of-text newline first, where nothing was kept); its first token is
    picked from the scores after the last of them. A longer one (or any, where there is no
    stepper) is read at once by the module.

    Args:
        found: the prompt's tokens and the kept state they extend, where the engine has looked.
    """

    def __init__(self, request: Request, engine: Engine, found: _Found | None = None) -> None:
        config = request.config
        tokenizer = engine.tokenizer
        prompt = found[0] if found is not None else tokenizer.encode(request.prompt)
        self.ids = [tokenizer.newline_id, *prompt]  # start of text, as read() does
        request.prompt_tokens = len(prompt)
        kept = found[1] if found is not None else engine.cache.lookup(self.ids)
        rest = self.ids[_kept_tokens(kept) :]  # a copy: the steps pop what they read
        self.context: Context | None = None  # the read state it joins from ...
        self.start: Entry | None = None  # ... or the kept state it reads ``pending`` on from
        pending: list[int] = []
        if engine.stepper is not None and len(rest) <= PREFILL_TOKENS:
            pending, self.start = rest, kept
        else:
            self.context = engine.read(request.prompt, self.ids, kept)
        picker = Picker(config, make_generator(config.seed), tokenizer, 1, self.ids[-HISTORY_TOKENS:])
        super().__init__(RowDecoder(tokenizer, config, picker, tail=request.prompt[-TAIL_CHARS:]), pending)
        self.request = request
        self.joined = False
        self.kept = not pending  # its state after the prompt is in the cache (or it read none)
        self.generated: list[int] = []  # the tokens it picked, for the cache (kept only if it is on)


class Engine:
    """The batched generation loop of one model, in a thread of its own.

    Args:
        max_rows: requests generated at once (more are refused with :class:`Busy`).
        cache_bytes: the size of its cache of states (:class:`StateCache`; 0: none).
        threads: threads of arithmetic for every step, where the caller leaves the process's
            arithmetic to the engine's thread (:func:`~charlm.serve.server.serve` runs its main
            thread on one, and its prompt thread runs on one); None: one thread for a step of up
            to :data:`ONE_THREAD_ROWS` rows, the process's setting for more.
    """

    def __init__(
        self,
        network: RNNLM,
        tokenizer: Tokenizer,
        max_rows: int = 256,
        cache_bytes: int = CACHE_BYTES,
        threads: int | None = None,
    ) -> None:
        self.network, self.tokenizer, self.max_rows = network.eval(), tokenizer, max_rows
        self.cache = StateCache(cache_bytes)
        # the CPU's fast path, where there is one (set to None before start() for the module's)
        self.stepper = fast_stepper(network)
        self._threads = threads or torch.get_num_threads()  # the process's, for large batches
        self._small_rows = 0 if threads else ONE_THREAD_ROWS  # steps up to this size: one thread
        self._rows: list[_Row] = []
        self._arrived: list[Request] = []
        self._reading: list[Request] = []  # long prompts being read in the prompt thread
        self._prompts: ThreadPoolExecutor | None = None
        self._last_read: tuple[str, Context] | None = None  # the prompt read last, and what it gave
        self._lock = threading.Condition()
        self._running = False
        self._draining = False  # drain() asked; the engine's thread ends the streams
        self._thread: threading.Thread | None = None
        self._pieces = Pieces()  # this step's, handed to the event loops once it is over
        self._sampler: BatchSampler[_Row] | None = None  # the rows' states and text: the engine thread's
        self.steps = 0

    @property
    def alive(self) -> bool:
        """Always: a failure of a step ends the streams it held, not the engine."""
        return True

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
        with self._lock:
            make_room(
                len(requests), len(self._rows) + len(self._arrived) + self._still_reading(), self.max_rows
            )
            self._arrived.extend(requests)
            self._lock.notify()

    def start(self) -> None:
        self._sampler = self._new_sampler()
        self._running = True
        # one thread of arithmetic: a team of its own would slow the engine's (see ONE_THREAD_ROWS)
        self._prompts = ThreadPoolExecutor(
            1, thread_name_prefix="charlm-prompts", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._thread = threading.Thread(target=self._loop, name="charlm-engine", daemon=True)
        self._thread.start()

    def _new_sampler(self) -> BatchSampler[_Row]:
        return BatchSampler[_Row](Rows(self.network, self.stepper), self.tokenizer.unk_id)

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
            row.left = True  # it leaves the batch at the next step
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

    def read(self, prompt: str, ids: list[int], kept: Entry | None = None) -> Context:
        """The model's context after ``prompt`` (its tokens ``ids``, the start-of-text newline
        first): read at once by the module, on from the kept state ``kept`` where there is one
        (its tokens a prefix of ``ids``), or the last read's again where it is the same text,
        since a request of n choices, or the same prompt sent again, is n rows of one text (a
        100,000-character prompt with n=16 was read 16 times). What it reads is kept in the
        cache. Rows copy what they take from it: it is never changed."""
        last = self._last_read
        if last is not None and last[0] == prompt:
            return last[1]
        if kept is None:
            context = read(self.network, self.tokenizer, prompt, ids=ids[1:])
        else:
            scores = kept.logits if kept.logits is not None else torch.zeros(self.network.config.vocab_size)
            start = Context(kept.hidden, scores, [], "", kept.tokens - 1)
            context = read(self.network, self.tokenizer, prompt, start, ids=ids[kept.tokens :])
        self.cache.put(ids, context.hidden, context.logits)
        self._last_read = (prompt, context)
        return context

    def _loop(self) -> None:
        """Step until stopped; a failure of a step ends the streams it held, not the engine."""
        while self._running:
            try:
                self._work()
            except Exception as exc:  # the engine must outlive any one request
                with self._lock:
                    rows, self._rows = self._rows, []
                self._sampler = self._new_sampler()  # whatever state the step left
                self._pieces = Pieces()  # a finish held back here would be a row's second
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
                # at once), and so is a long one's that extends a kept state by a few tokens; a
                # longer read is the prompt thread's, which reads it at once with the module
                # while the steps go on.
                found = self._find(request.prompt)
                if found is not None and len(found[0]) + 1 - _kept_tokens(found[1]) <= PREFILL_TOKENS:
                    self._admit(request, found)
                else:
                    with self._lock:
                        self._reading.append(request)
                    assert self._prompts is not None
                    self._prompts.submit(self._admit_read, request, found)
            with self._lock:
                rows = list(self._rows)
            if rows:
                self._step(rows)

    def _find(self, text: str) -> _Found | None:
        """``text``'s tokens and the kept state it extends, where it is short enough to encode in
        the engine's thread, else None (the prompt thread does it)."""
        if len(text) > ENCODE_CHARS:
            return None
        try:
            ids = self.tokenizer.encode(text)
        except Exception:  # let the prompt thread meet it and say so
            return None
        return ids, self.cache.lookup([self.tokenizer.newline_id, *ids])

    def _admit(self, request: Request, found: _Found | None = None) -> None:
        """Make ``request``'s row (from what :meth:`_find` found, where it was called) and add it
        to the next step."""
        try:
            row = _Row(request, self, found)
        except Exception as exc:  # a request's failure is its own, never the engine's
            request.emit("", f"error: {exc}")
            return
        with self._lock:
            if not request.cancelled.is_set():
                self._rows.append(row)
                self._lock.notify()

    def _admit_read(self, request: Request, found: _Found | None = None) -> None:
        """:meth:`_admit` in the prompt thread: a request ended meanwhile (shutdown: it has had its
        finish; its client gone) is dropped, before its read where it can be."""
        row: _Row | Exception | None = None
        with self._lock:
            ended = request not in self._reading or request.cancelled.is_set()
        if not ended:
            try:
                row = _Row(request, self, found)
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
        """Emit with the rest of this step's pieces (a :class:`Sink`'s), or now."""
        self._pieces.add(request.emit, piece, finish)

    def _step(self, rows: list[_Row]) -> None:
        """One step of the sampler: the rows admitted since the last join it, every row that has
        read its prompt picks a token and sends its text, finished rows and rows whose client has
        gone are dropped, and the rest advance in one batched step (with the prompts still being
        read)."""
        sampler = self._sampler
        assert sampler is not None
        for row in rows:
            if row.request.cancelled.is_set():
                row.left = True
            elif not row.joined:
                if row.decoder.finish is not None:  # nothing to generate (a length of 0)
                    self._send(row.request, "", row.decoder.finish)
                    row.left = True
                    continue
                if row.context is not None:
                    sampler.join([row], row.context.hidden, row.context.logits)
                elif row.start is not None:  # to read the rest of its prompt through the steps
                    sampler.join([row], row.start.hidden, row.start.logits)
                else:  # to read its prompt through the steps
                    sampler.join([row])
                row.joined, row.context, row.start = True, None, None
        caching = self.cache.max_bytes > 0
        if caching:
            self._keep_prompts(rows)
        for row, text in sampler.pick():
            request = row.request
            request.completion_tokens = row.decoder.tokens
            if text:
                self._send(request, text, None)
            if caching:
                row.generated.append(row.token)
            if row.decoder.finish is not None:
                if caching:  # its state before its last token, kept before the client hears of
                    # the end: the next turn, which may come at once, reads on from it
                    hidden, _ = sampler.state(row)
                    self.cache.put(row.ids + row.generated[:-1], hidden, None)
                self._send(request, "", row.decoder.finish)
                row.left = True
        self._pieces.flush()
        with self._lock:
            self._rows = [r for r in self._rows if not r.left]
        going = sampler.going()
        if going:
            self._advance(going)
        else:  # every row has left: the batch empties, with no step
            sampler.advance(going)
        self.steps += 1

    def _keep_prompts(self, rows: list[_Row]) -> None:
        """Keep the state of each row that has just read the last of its prompt in the steps:
        before it picks, while its scores are the model's own (picking masks them)."""
        assert self._sampler is not None
        for row in rows:
            if not row.kept and row.joined and not row.pending and not row.left:
                hidden, scores = self._sampler.state(row)
                self.cache.put(row.ids, hidden, torch.from_numpy(scores))
                row.kept = True

    def _advance(self, going: list[_Row]) -> None:
        """One batched recurrent step of the rows that go on (the others leave the batch), on one
        thread of arithmetic for a small batch unless it has the process's to itself (see
        :data:`ONE_THREAD_ROWS`)."""
        assert self._sampler is not None
        threads = 1 if len(going) <= self._small_rows and self.stepper is not None else self._threads
        if threads != torch.get_num_threads():  # this thread's own setting
            torch.set_num_threads(threads)
        self._sampler.advance(going)
