"""Running the API: load the runs, start an engine for each, and serve on uvicorn until SIGTERM or
Ctrl-C, which end every stream properly (its last chunk and ``[DONE]``) and exit with code 0."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from charlm.api import load
from charlm.errors import ConfigError, ServeError
from charlm.serve.app import Limits, create_app
from charlm.serve.engine import Engine


class _Server(uvicorn.Server):
    """uvicorn's server, with two changes on SIGTERM or SIGINT: every stream is ended first (so
    graceful shutdown does not wait for long generations), and the signal is not raised again
    after shutdown (uvicorn does so that a default handler ends the process; a server that shut
    down cleanly exits with 0)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def model_ids(runs: Sequence[Path]) -> list[str]:
    """An id per run: its directory's name, or its path where two names are the same."""
    names = [run.name for run in runs]
    return [run.name if names.count(run.name) == 1 else str(run) for run in runs]


def serve(
    runs: Sequence[Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    max_streams: int = 256,
    limits: Limits | None = None,
    on_status: Callable[[str], None] = lambda message: None,
) -> None:
    """Serve ``runs`` until stopped.

    Raises:
        ConfigError: bad limits or port. CheckpointError: a run cannot be loaded. ServeError: the
        address cannot be listened on (taken, or not this machine's).
    """
    if max_streams < 1:
        raise ConfigError("--max-streams must be at least 1")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    limits = limits or Limits()
    for value, flag in ((limits.max_tokens, "--max-tokens"), (limits.max_prompt_chars, "--max-prompt")):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    models = [load(run, checkpoint, device) for run in runs] if runs else [load(None, checkpoint, device)]
    engines = {
        name: Engine(model.network, model.run.tokenizer, max_streams)
        for name, model in zip(model_ids([m.path for m in models]), models, strict=True)
    }
    listening = _listen(host, port)  # before a word is said; uvicorn would log a taken port, exit with 3
    port = listening.getsockname()[1]
    if not api_key and not _loopback(host):
        on_status(
            f"warning: serving on {host} without an API key: anyone who can reach it can use it "
            "(set --api-key or CHARLM_API_KEY)"
        )
    app = create_app(engines, api_key or None, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    server = _Server(config, lambda: [engine.drain() for engine in engines.values()])
    for engine in engines.values():
        engine.start()
    on_status(f"serving {', '.join(engines)} on http://{host}:{port} (pid {os.getpid()})")
    try:
        server.run(sockets=[listening])
    finally:
        for engine in engines.values():
            engine.stop()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, as uvicorn binds one (port 0: any free port).

    Raises:
        ServeError: the address is taken, or not one of this machine's.
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listening = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror: a host that does not resolve
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(info[4])
    except OSError as exc:
        listening.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listening


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
