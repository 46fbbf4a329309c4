"""What passes between the server's routes and an engine: a :class:`Request` (one choice's
prompt and sampling, and where its text goes: a :class:`Sink` in an event loop), the refusals
:class:`Busy` and :class:`TooLarge`, and what the routes need of an engine (:class:`Generates`).
Apart from the engines, which run the model, so that the server's HTTP process, whose engines
run in processes of their own (:mod:`charlm.serve.process`), does not import PyTorch."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from charlm.config import SampleConfig
from charlm.errors import CharlmError

# The cache of states' size by default: thousands of conversations of a default model (a state of
# a few kilobytes, its scores and its token ids).
CACHE_BYTES = 64 * 2**20

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


class Pieces:
    """A step's pieces, gathered by the event loop of their :class:`Sink`, so that each loop is
    woken once a step, not once a token (an emit that is no Sink is called at once)."""

    def __init__(self) -> None:
        self._out: dict[asyncio.AbstractEventLoop, list] = {}

    def add(self, emit: Emit, piece: str, finish: str | None) -> None:
        if isinstance(emit, Sink):
            self._out.setdefault(emit.loop, []).append((emit.queue, (emit.index, piece, finish)))
        else:
            emit(piece, finish)

    def flush(self) -> None:
        """Hand what was gathered to each loop, at once."""
        out, self._out = self._out, {}
        for loop, items in out.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits for these
                loop.call_soon_threadsafe(_deliver, items)


class Busy(CharlmError):
    """Every row is taken: the request is refused (HTTP 429), not queued without bound."""


class TooLarge(CharlmError):
    """A request of more streams than the engine ever generates at once (HTTP 400: waiting would
    not help)."""


def make_room(asked: int, running: int, max_rows: int) -> None:
    """Refuse ``asked`` more streams beside ``running`` where they would be more than ``max_rows``.

    Raises:
        TooLarge: they are more than ``max_rows`` by themselves. Busy: with those running.
    """
    if asked > max_rows:
        raise TooLarge(f"this request asks for {asked} streams (prompts x n); this server generates "
                       f"at most {max_rows} at once")  # fmt: skip
    if running + asked > max_rows:
        raise Busy(f"the server is generating {max_rows} streams at once; try again shortly")


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


class Generates(Protocol):
    """What the routes need of an engine: :class:`~charlm.serve.engine.Engine` in the server's process, or
    :class:`~charlm.serve.process.EngineProcess` for one in a process of its own."""

    @property
    def active(self) -> int: ...

    @property
    def alive(self) -> bool:
        """False once it can no longer generate (its process has ended): ``/health`` says so."""
        ...

    def submit(self, requests: list[Request]) -> None: ...
