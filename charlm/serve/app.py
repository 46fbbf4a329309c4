"""The HTTP face: the shape of the OpenAI completions API on Starlette, over one :class:`Engine`
per run served. Bad requests get a 4xx with an OpenAI-style JSON error, never a 500."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.config import SampleConfig
from charlm.errors import ConfigError
from charlm.serve.engine import Busy, Engine, Request, Sink


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for."""

    max_tokens: int = 4096
    max_prompt_chars: int = 100_000
    max_n: int = 16


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# A stream's chunks go out at most this often (seconds): what a stream generated in between goes
# out in one chunk. A chunk costs the server a socket write (the most of its time per chunk under
# load, measured), so a write per token per stream spent a third of the event loop's busy time on
# writes at 32 streams; 10 ms is below what a reader can see and far under the 50 ms inter-token
# target.
STREAM_INTERVAL = 0.01


def create_app(
    engines: Mapping[str, Engine],
    api_key: str | None = None,
    limits: Limits | None = None,
    stream_interval: float = STREAM_INTERVAL,
) -> Starlette:
    """The ASGI app serving ``engines`` by model id. ``stream_interval``: the least time between
    two chunks of one stream (its first goes out at once)."""
    limits = limits or Limits()
    created = int(time.time())

    def authorise(request: HttpRequest) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key",
                           code="invalid_api_key")  # fmt: skip

    async def models(request: HttpRequest) -> Response:
        try:
            authorise(request)
        except ApiError as exc:
            return exc.response()
        data = [{"id": name, "object": "model", "created": created, "owned_by": "charlm"} for name in engines]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: HttpRequest) -> Response:
        return JSONResponse(
            {"status": "ok", "models": list(engines), "active": {n: e.active for n, e in engines.items()}}
        )

    async def page(request: HttpRequest) -> Response:
        return HTMLResponse(resources.files("charlm.serve").joinpath("page.html").read_text(encoding="utf-8"))

    async def completions(request: HttpRequest) -> Response:
        try:
            authorise(request)
            body = await _json_body(request)
            name, prompts, config, n, stream = _parse(body, engines, limits)
        except ApiError as exc:
            return exc.response()
        loop = asyncio.get_running_loop()
        queue = _Pieces()
        rows = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                seed = None if config.seed is None else config.seed + j
                rows.append(Request(prompt, _with_seed(config, seed), Sink(loop, queue, index)))
        try:
            engines[name].submit(rows)
        except Busy as exc:
            return ApiError(429, str(exc), "rate_limit_exceeded", code="rate_limit_exceeded").response()
        ident, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            events = _events(queue, rows, ident, now, name, stream_interval)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            texts, reasons = await _collect(queue, len(rows))
        finally:
            for row in rows:
                row.cancelled.set()
        if any(r and r.startswith("error") for r in reasons):
            return ApiError(400, next(r for r in reasons if r and r.startswith("error"))).response()
        usage = _usage(rows)
        choices = [
            {"text": texts[i], "index": i, "logprobs": None, "finish_reason": reasons[i]}
            for i in range(len(rows))
        ]
        return JSONResponse({"id": ident, "object": "text_completion", "created": now, "model": name,
                             "choices": choices, "usage": usage})  # fmt: skip

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", page, methods=["GET"]),
        ],
        exception_handlers={Exception: _internal},
    )


async def _internal(request: HttpRequest, exc: Exception) -> Response:
    """A failure of the server itself: still OpenAI's error shape, and no traceback to the client."""
    return ApiError(500, "internal error", "server_error").response()


def _with_seed(config: SampleConfig, seed: int | None) -> SampleConfig:
    import dataclasses

    return dataclasses.replace(config, seed=seed)


def _usage(rows: list[Request]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Pieces(asyncio.Queue):
    """A request's (index, piece, finish) items from the engine. A stream waiting out its interval
    (:meth:`nap`) is woken when one ends a choice, so that it sends it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = False  # a choice ended since the stream last sent
        self._nap: asyncio.Future[None] | None = None

    def put_nowait(self, item: tuple[int, str, str | None]) -> None:
        super().put_nowait(item)
        if item[2] is not None:
            self.ended = True
            if self._nap is not None:
                _settle(self._nap)

    async def nap(self, seconds: float) -> None:
        """Wait ``seconds``, or until a choice ends (as asyncio.sleep does it: a future and a
        timer, no task per wait as asyncio.wait_for would make)."""
        if self.ended:
            return
        loop = asyncio.get_running_loop()
        self._nap = nap = loop.create_future()
        timer = loop.call_later(seconds, _settle, nap)
        try:
            await nap
        finally:
            timer.cancel()
            self._nap = None


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _collect(queue: asyncio.Queue, count: int) -> tuple[list[str], list[str | None]]:
    texts: list[list[str]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    done = 0
    while done < count:
        index, piece, finish = await queue.get()
        texts[index].append(piece)
        if finish is not None:
            reasons[index] = finish
            done += 1
    return ["".join(t) for t in texts], reasons


async def _events(
    queue: _Pieces, rows: list[Request], ident: str, created: int, name: str, interval: float
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: chunks of text per choice, a last one per choice
    with its finish reason, then ``[DONE]``. A chunk goes out at most every ``interval`` seconds,
    with every piece that is waiting by then (one event per choice, not per token), so a busy
    server spends its time generating rather than writing to sockets; the first chunk, and a
    choice's last, go out at once (a request is over when its text is). A client that goes away
    frees its rows at the next step: Starlette cancels this generator when uvicorn reports the
    disconnect, even while it waits (Starlette listens for it where the server speaks ASGI 2.3,
    as uvicorn does; under 2.4 it would notice only at the next write, which
    test_a_stream_sends_what_it_has_at_most_every_interval catches)."""
    loop = asyncio.get_running_loop()
    done, last = 0, -math.inf
    try:
        while done < len(rows):
            items = [await queue.get()]
            wait = last + interval - loop.time()
            if wait > 0:
                await queue.nap(wait)
            queue.ended = False
            last = loop.time()
            while not queue.empty():
                items.append(queue.get_nowait())
            texts: dict[int, list[str]] = {}
            finished: dict[int, str] = {}
            for index, piece, finish in items:
                texts.setdefault(index, []).append(piece)
                if finish is not None:
                    finished[index] = "stop" if finish.startswith("error") else finish
            events = []
            for index, parts in texts.items():
                choice = {"text": "".join(parts), "index": index, "logprobs": None,
                          "finish_reason": finished.get(index)}  # fmt: skip
                chunk = {"id": ident, "object": "text_completion", "created": created, "model": name,
                         "choices": [choice]}  # fmt: skip
                events.append(f"data: {json.dumps(chunk)}\n\n")
            done += len(finished)
            yield "".join(events)
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled.set()


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    return value


def _parse(
    body: dict[str, Any], engines: Mapping[str, Engine], limits: Limits
) -> tuple[str, list[str], SampleConfig, int, bool]:
    """The request's fields, checked: (model, prompts, sampling, n, stream)."""
    name = _field(body, "model", (str,), None)
    if name is None:
        raise ApiError(400, "'model' is required", param="model")
    if name not in engines:
        raise ApiError(404, f"the model '{name}' does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")  # fmt: skip
    prompt = _field(body, "prompt", (str, list), "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
    if any(len(p) > limits.max_prompt_chars for p in prompts):
        raise ApiError(400, f"a prompt is longer than {limits.max_prompt_chars} characters", param="prompt")
    max_tokens = _field(body, "max_tokens", (int,), 16)
    n = _field(body, "n", (int,), 1)
    stop = _field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    checks = [
        (1 <= max_tokens <= limits.max_tokens, "max_tokens", f"between 1 and {limits.max_tokens}"),
        (1 <= n <= limits.max_n, "n", f"between 1 and {limits.max_n}"),
        (len(prompts) * n <= limits.max_n * 4, "n", "at most 4x n prompts"),
        (all(isinstance(s, str) for s in stops) and len(stops) <= 4, "stop", "a string or up to 4 strings"),
    ]
    for ok, param, what in checks:
        if not ok:
            raise ApiError(400, f"'{param}' must be {what}", param=param)
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    presence = float(_field(body, "presence_penalty", (int, float), 0.0))
    frequency = float(_field(body, "frequency_penalty", (int, float), 0.0))
    for value, param, low, high in ((temperature, "temperature", 0, 2), (presence, "presence_penalty", -2, 2),
                                    (frequency, "frequency_penalty", -2, 2)):  # fmt: skip
        if not low <= value <= high:
            raise ApiError(400, f"'{param}' must be between {low} and {high}", param=param)
    try:
        config = SampleConfig(
            length=max_tokens,
            temperature=temperature,
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", (int,), 0),
            min_p=float(_field(body, "min_p", (int, float), 0.0)),
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0)),
            stop=tuple(stops),
            seed=_field(body, "seed", (int,), None),
        )
    except ConfigError as exc:
        message = str(exc)
        for flag in ("top-p", "top-k", "min-p", "repetition-penalty"):
            message = message.replace(f"--{flag}", flag.replace("-", "_"))
        raise ApiError(400, message) from None
    return name, prompts, config, n, bool(_field(body, "stream", (bool,), False))
