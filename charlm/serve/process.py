"""An engine in a process of its own, so that its steps never wait for the server's event loop.

In one process the engine's thread and the event loop share one interpreter: each small product
the step hands to BLAS lets the loop take the interpreter, and the step waits for the loop's turn
to end before its next line of Python. Under load that held the server near 8,000 tokens/s at 32
streams on a 2-core CPU where the engine alone made 13,000 to 15,000
(docs/benchmarks/serve-load.md). Here the :class:`~charlm.serve.engine.Engine` runs unchanged in a
child process (a new interpreter, ``python -m charlm.serve.process``: a forked OpenMP runtime can
hang, and multiprocessing's "spawn" would run the caller's script again), and the server holds an
:class:`EngineProcess`, which the routes use as they would the engine: ``submit`` (refusing with
``Busy`` or ``TooLarge`` at once), ``active``, ``drain``, ``stop``.

Between the two, one pipe each way: requests, cancellations, drain and stop go to the child; the
child sends each step's pieces as one message (index, piece, finish and the request's token
counts), which a thread of the server hands to each event loop at once, one wake-up a step as the
engine does in one process. The child runs in a session of its own and ignores SIGINT and SIGTERM:
the server drains its streams and stops it, and it ends when the server's end of the pipe closes,
even where the server was killed. One that ends otherwise (killed, crashed) fails its requests and
every later one, and the server says so (:attr:`EngineProcess.alive`, ``/health``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from charlm import errors
from charlm.config import SampleConfig
from charlm.errors import CharlmError, ServeError
from charlm.serve.streams import Pieces, Request, Sink, make_room

# how long the server waits for a child to load its model and say it is ready (seconds)
START_SECONDS = 300.0
# (request id, piece, finish, prompt tokens, completion tokens): one row's part of a step's message
_Piece = tuple[int, str, str | None, int, int]


class EngineProcess:
    """The server's side of an engine in a child process: the same ``submit``, ``active``,
    ``start``, ``drain`` and ``stop`` as :class:`~charlm.serve.engine.Engine`.

    Args:
        run: the run directory the child loads (None: the latest run; ``checkpoint`` and
            ``device`` as :func:`charlm.load`). Once started, ``run`` is the one it loaded.
        max_rows, cache_bytes: the engine's (see :class:`~charlm.serve.engine.Engine`); the
            server counts the rows itself, so that a refusal is said at once.
        threads: the engine's threads of arithmetic; None: the child's default.
    """

    def __init__(
        self,
        run: Path | None,
        checkpoint: str,
        device: str,
        max_rows: int,
        cache_bytes: int,
        threads: int | None = None,
    ) -> None:
        self.max_rows, self.run = max_rows, run
        self._args = (checkpoint, device, cache_bytes, threads)
        self._requests: dict[int, Request] = {}  # sent, not yet finished nor cancelled
        self._next = 0
        # the requests, and the pipe's sending end; reentrant, since an emit called under it may
        # cancel its request
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        # the child's exit code, where it ended without being told to stop (killed, crashed)
        self.ended: int | None = None
        # called (from the pipe's thread) with that exit code when it does, to say so
        self.on_end: Callable[[int], None] | None = None

    @property
    def alive(self) -> bool:
        """False once the child has ended without being told to stop: its requests fail."""
        return self.ended is None

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._requests)

    def start(self) -> None:
        """Start the child and wait until its engine runs (:meth:`launch`, then :meth:`wait`)."""
        self.launch()
        self.wait()

    def launch(self) -> None:
        """Start the child, which loads the run (several children load theirs at once)."""
        checkpoint, device, cache_bytes, threads = self._args
        run = None if self.run is None else str(self.run)
        args = json.dumps({"run": run, "checkpoint": checkpoint, "device": device,
                           "cache_bytes": cache_bytes, "threads": threads})  # fmt: skip
        # One OpenBLAS thread, unless told otherwise: its second thread waits for work by spinning,
        # and took most of a core from the server and its clients, more than it gave the step
        # (docs/benchmarks/serve-load.md). The step's prepacked products keep torch's threads.
        env = {"OPENBLAS_NUM_THREADS": "1", **os.environ}
        # the child imports what this process would (charlm from where it was found), as
        # multiprocessing's children do
        env["PYTHONPATH"] = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        mine, theirs = socket.socketpair()
        with mine, theirs:  # each side's Connection owns a duplicate
            # A session of its own: Ctrl-C at the terminal, or a signal to the server's process
            # group, is the server's to handle (it ends the streams, then stops the child). -P
            # (Python 3.11+): the working directory's modules (a user's random.py) do not shadow
            # the ones the server imports.
            safe = ["-P"] if sys.version_info >= (3, 11) else []
            self._process = subprocess.Popen(
                [sys.executable, *safe, "-m", "charlm.serve.process", str(theirs.fileno()), args],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip
            self._conn = Connection(mine.detach())
        # the child's end is closed here: ours alone reads EOF when the child has gone

    def wait(self) -> None:
        """Wait until the child's engine runs.

        Raises:
            CharlmError: the child could not load the run (its own error, a CheckpointError or a
            DeviceError, raised again here), or it ended before it was ready (ServeError).
        """
        assert self._conn is not None and self._process is not None, "launch() first"
        failed: CharlmError | None = None
        try:
            if not self._conn.poll(START_SECONDS):
                failed = ServeError(f"the engine's process did not start in {START_SECONDS:g} s")
            else:
                said = self._conn.recv()
                if said[0] == "ready":
                    self.run = Path(said[1])
                else:
                    kind, template, fields = said[1:]
                    error = getattr(errors, kind, None)
                    if not (isinstance(error, type) and issubclass(error, CharlmError)):
                        error = ServeError
                    failed = error(template, fields=fields)
        except (EOFError, OSError):
            failed = ServeError(
                f"the engine's process ended as it started (exit code {self._process.poll()})"
            )
        if failed is not None:
            self.stop()
            raise failed
        self._reader = threading.Thread(target=self._read, name="charlm-engine-pipe", daemon=True)
        self._reader.start()

    def submit(self, requests: list[Request]) -> None:
        """Send ``requests`` to the child (a request's ``n`` choices together, all or none).

        Raises:
            TooLarge: they are more than ``max_rows``. Busy: they would exceed it now.
        """
        with self._lock:
            make_room(len(requests), len(self._requests), self.max_rows)
            sent = []
            for request in requests:
                key, self._next = self._next, self._next + 1
                self._requests[key] = request
                request.cancelled = _Cancel(self, key)
                sent.append((key, request.prompt, request.config))
            alive = self._send(("submit", sent))
            if not alive:
                for key, _, _ in sent:
                    del self._requests[key]
        if not alive:
            for request in requests:
                self._gone(request)

    def drain(self) -> None:
        """End every stream now (shutting down): the child's engine gives each its last piece."""
        with self._lock:
            self._send(("drain", None))

    def stop(self) -> None:
        """Stop the child's engine and wait for the child (then end it, where it will not go)."""
        with self._lock:
            self._stopping = True
            self._send(("stop", None))
        if self._process is not None:
            try:  # one still loading its run has no streams to end: it need not be waited for
                self._process.wait(timeout=10 if self._reader is not None else 0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._conn is not None:
            self._conn.close()

    def _send(self, message: tuple[str, Any]) -> bool:
        """Send to the child (the lock held); False where it has gone."""
        if self._conn is None:
            return False
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # a broken pipe; a closed connection
            return False
        return True

    def _cancel(self, key: int) -> None:
        """A request's client has gone: it frees its place at once, its row at the child's next
        step (where it is still there: a finished one has no key here)."""
        with self._lock:
            if self._requests.pop(key, None) is not None:
                self._send(("cancel", key))

    def _read(self) -> None:
        """Hand each step's pieces to the event loops of their requests, until the child ends;
        then every request still open ends with an error (never a quiet stop)."""
        assert self._conn is not None
        while True:
            try:
                pieces: list[_Piece] = self._conn.recv()
            except (EOFError, OSError):
                break
            step = Pieces()
            with self._lock:
                for key, piece, finish, prompt_tokens, completion_tokens in pieces:
                    request = self._requests.get(key)
                    if request is None:  # cancelled meanwhile
                        continue
                    request.prompt_tokens, request.completion_tokens = prompt_tokens, completion_tokens
                    if finish is not None:
                        del self._requests[key]
                    step.add(request.emit, piece, finish)
            step.flush()
        with self._lock:
            left, self._requests = list(self._requests.values()), {}
            unasked = not self._stopping
        for request in left:
            self._gone(request)
        if unasked and self._process is not None:
            code = self._process.wait()
            self.ended = code
            if self.on_end is not None:
                self.on_end(code)

    @staticmethod
    def _gone(request: Request) -> None:
        with contextlib.suppress(RuntimeError):  # its event loop has closed
            request.emit("", "error: the engine's process has ended")


class _Cancel(threading.Event):
    """A request's ``cancelled``, which tells the child too when it is set."""

    def __init__(self, engine: EngineProcess, key: int) -> None:
        super().__init__()
        self._engine, self._key = engine, key

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._engine._cancel(self._key)


class _Pipe:
    """The child's stand-in for the event loop a :class:`Sink` hands pieces to: the engine's one
    call a step (and a lone piece's, such as a failed prompt's) becomes one message to the server."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # the engine's thread and its prompt thread both send
        self.pieces: list[_Piece] = []

    def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
        with self.lock:
            callback(*args)  # the step's delivery, or a _Box's put_nowait: fills self.pieces
            pieces, self.pieces = self.pieces, []
            with contextlib.suppress(OSError, ValueError):  # the server has gone: the child ends
                self.conn.send(pieces)


class _Box:
    """A request's queue, as the engine's :class:`Sink` sees it, in the child: its pieces go into
    the step's message, with the request's token counts."""

    def __init__(self, pipe: _Pipe, request: Request, done: dict[int, Request]) -> None:
        self.pipe, self.request, self.done = pipe, request, done

    def put_nowait(self, item: tuple[int, str, str | None]) -> None:
        key, piece, finish = item
        request = self.request
        self.pipe.pieces.append((key, piece, finish, request.prompt_tokens, request.completion_tokens))
        if finish is not None:
            self.done.pop(key, None)


def _child(
    conn: Connection, run: Path | None, checkpoint: str, device: str, cache_bytes: int, threads: int | None
) -> None:
    """The child: load the run, start its engine, say so, then carry out the server's messages
    until told to stop or the server has gone."""
    import torch

    from charlm.api import load
    from charlm.serve.engine import Engine

    torch.set_num_threads(1)  # this thread does no arithmetic (see serve())
    try:
        model = load(run, checkpoint, device)
        # the server counts rows and refuses the extra ones; here a cancelled row may linger a step
        engine = Engine(model.network, model.run.tokenizer, 2**31, cache_bytes, threads)
        engine.start()
    except CharlmError as exc:  # raised again by the server, as its own
        _say(conn, ("failed", type(exc).__name__, exc.template, exc.fields))
        return
    except Exception as exc:  # the server's failure to start
        _say(conn, ("failed", "ServeError", f"{type(exc).__name__}: {exc}", ()))
        return
    if not _say(conn, ("ready", str(model.path))):  # the server has gone meanwhile
        engine.stop()
        return
    pipe = _Pipe(conn)
    requests: dict[int, Request] = {}  # sent and not finished (a finished one is taken out)
    try:
        while True:
            try:
                kind, body = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "submit":
                batch = [_request(pipe, requests, *sent) for sent in body]
                engine.submit(batch)
            elif kind == "cancel":
                request = requests.pop(body, None)
                if request is not None:
                    request.cancelled.set()
            elif kind == "drain":
                engine.drain()
            else:
                break
    finally:
        engine.stop()


def _say(conn: Connection, message: tuple) -> bool:
    """Send ``message`` to the server; False where it has gone (the child then ends quietly)."""
    try:
        conn.send(message)
    except (OSError, ValueError):
        return False
    return True


def _request(
    pipe: _Pipe, requests: dict[int, Request], key: int, prompt: str, config: SampleConfig
) -> Request:
    request = Request(prompt, config, _noop)
    request.emit = Sink(pipe, _Box(pipe, request, requests), key)  # type: ignore[arg-type]
    requests[key] = request
    return request


def _noop(piece: str, finish: str | None) -> None:
    """A placeholder emit, replaced as soon as the request exists."""


if __name__ == "__main__":  # the child: python -m charlm.serve.process FD ARGS (EngineProcess.start)
    # The server stops it (a SIGTERM to all of a service's processes, as systemd sends, must not
    # cut the streams it is ending); it ends by itself when the server's end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    given = json.loads(sys.argv[2])
    _child(
        Connection(int(sys.argv[1])), given["run"] and Path(given["run"]), given["checkpoint"],
        given["device"], given["cache_bytes"], given["threads"],
    )  # fmt: skip
