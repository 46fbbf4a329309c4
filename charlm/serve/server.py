"""Running the API: load the runs, start an engine for each, and serve on uvicorn until SIGTERM or
Ctrl-C, which end every stream properly (its last chunk and ``[DONE]``) and exit with code 0."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from charlm.errors import ConfigError, Notice, ServeError
from charlm.generation.transcript import DEFAULT_FORMAT, ChatFormat
from charlm.serve.app import Limits, create_app
from charlm.serve.process import EngineProcess
from charlm.serve.streams import CACHE_BYTES


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
    chat_format: ChatFormat | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> None:
    """Serve ``runs`` until stopped.

    Args:
        chat_format: how the chat endpoint writes a conversation as text (see
            :func:`read_chat_format`); default, ``charlm chat``'s transcript.
        cache_bytes: the size of each model's cache of recent prompts' states (0: none).

    Raises:
        ConfigError: bad limits or port. CheckpointError: a run cannot be loaded. DeviceError: no
        such device. ServeError: the address cannot be listened on (taken, or not this
        machine's), or an engine's process cannot start.
    """
    if max_streams < 1:
        raise ConfigError("{max_streams} must be at least 1", fields=("max_streams",))
    if cache_bytes < 0:
        raise ConfigError("{state_cache} must not be negative (0: no cache)", fields=("state_cache",))
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"{{port}} must be between 0 and 65535 (0: any free port), got {port}", fields=("port",)
        )
    limits = limits or Limits()
    for value, field in ((limits.max_tokens, "max_tokens"), (limits.max_prompt_chars, "max_prompt_chars")):
        if value < 1:
            raise ConfigError(f"{{{field}}} must be at least 1, got {value}", fields=(field,))
    # Each engine's process loads its run and steps it; this one only speaks HTTP, and never
    # imports PyTorch (a caller's own setting of its threads is passed on).
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    processes: list[EngineProcess] = []
    listening: list[socket.socket] = []
    # Ctrl-C while the engines load ends the server as it does once uvicorn serves, which handles
    # SIGINT whatever it found: a background job of a shell without job control starts with it
    # ignored, and loading then went on deaf to it
    main = threading.current_thread() is threading.main_thread()
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    try:
        listening = _listen(host, port)  # before a word is said
        port = listening[0].getsockname()[1]
        unique: dict[Path, Path] = {}  # a run given twice (runA ./runA) is one model: one engine
        for run in runs:
            unique.setdefault(Path(run).resolve(), Path(run))
        processes = [
            EngineProcess(run, checkpoint, device, max_streams, cache_bytes, threads)
            for run in (list(unique.values()) or [None])
        ]
        for engine in processes:  # the runs load at once, each in its process
            engine.launch()
        for engine in processes:
            engine.wait()
        engines = dict(
            zip(model_ids([e.run for e in processes if e.run is not None]), processes, strict=True)
        )
        for name, engine in engines.items():
            engine.on_end = lambda code, name=name: on_status(
                f"error: the engine of {name} has ended (exit code {code}); its requests fail until "
                "the server is restarted (GET /health answers 503)"
            )
        if not api_key and not _loopback(host):
            on_status(
                Notice(
                    f"warning: serving on {host or 'every interface'} without an API key: anyone who can "
                    "reach it can use it (set {api_key} or CHARLM_API_KEY)",
                    fields=("api_key",),
                )
            )
        app = create_app(engines, api_key or None, limits, chat_format=chat_format or DEFAULT_FORMAT)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10, lifespan="off"
        )  # no startup or shutdown of its own: without one, a second Ctrl-C printed its traceback
        server = _Server(config, lambda: [engine.drain() for engine in processes])
        shown = f"[{host}]" if ":" in host else host or "0.0.0.0"  # an IPv6 address in a URL; "": all
        on_status(f"serving {', '.join(engines)} on http://{shown}:{port} (pid {os.getpid()})")
        server.run(sockets=listening)
    finally:
        for engine in processes:  # one never started stops at once
            engine.stop()
        for sock in listening:
            sock.close()
        if interrupt is not None:
            signal.signal(signal.SIGINT, interrupt)


def read_chat_format(path: Path) -> ChatFormat:
    """A chat format from a JSON file: an object whose ``system``, ``user`` and ``assistant``
    (each optional: the default's where missing) are templates holding ``{content}`` once, for
    example ``{"user": "Q: {content}\\n", "assistant": "A: {content}\\n\\n"}``.

    Raises:
        ConfigError: the file cannot be read, or is not such an object.
    """

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{{chat_format}} {path}: {why}", fields=("chat_format",))

    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    except ValueError as exc:
        raise refuse(f"not JSON ({exc})") from None
    roles = ("system", "user", "assistant")
    if (
        not isinstance(given, dict)
        or set(given) - set(roles)
        or not all(isinstance(v, str) for v in given.values())
    ):
        raise refuse('must be a JSON object of strings with the keys "system", "user" and "assistant"')
    try:
        return ChatFormat(**given)
    except ConfigError as exc:
        raise refuse(exc.worded(lambda role: f'"{role}"')) from None


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names (port 0: any free port, the same on all),
    as asyncio would make them for uvicorn: IPv6 ones IPv6 only, "" all interfaces. Made here so
    that a taken port is an error before a word is said (uvicorn logged it and exited with 3).

    Raises:
        ServeError: the address is taken, or not one of this machine's.
    """
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            listening = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listening.bind((address[0], port, *address[2:]))
            listening.listen(2048)  # now: with SO_REUSEADDR two bound sockets clash only here
            port = listening.getsockname()[1]
    except OSError as exc:  # socket.gaierror too: a host that does not resolve
        for listening in sockets:
            listening.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
