"""The HTTP face: the shape of the OpenAI completions API on Starlette, over one :class:`Engine`
per run served. Bad requests get a 4xx with an OpenAI-style JSON error, never a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.config import SampleConfig
from charlm.errors import ConfigError
from charlm.serve.engine import Busy, Engine, Request, Sink, TooLarge


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message may quote what the client sent, lone surrogates included, which
        # UTF-8 cannot encode (Starlette's JSONResponse failed on them with a 500)
        return Response(json.dumps(self.body()), self.status, media_type="application/json")


# The fields of OpenAI's completions request, and charlm's own sampling controls. Any other is
# refused, as OpenAI does: a misspelt "temprature" must not be ignored without a word.
FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
    "top_p", "user", "top_k", "min_p", "repetition_penalty",
})  # fmt: skip
# Fields of OpenAI's that charlm does not do, accepted only at their "off" values: a client that
# scores text with echo and logprobs must hear that it gets none, not receive text without them.
UNSUPPORTED = {"best_of": (None, 1), "logit_bias": (None, {}), "logprobs": (None,), "suffix": (None, "")}


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
        # bytes: compare_digest refuses non-ASCII text (a 500), and Starlette decodes headers as
        # Latin-1, so the header's own bytes are what the key's UTF-8 must equal
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given, key = token.strip().encode("latin-1"), (api_key or "").encode("utf-8")
        if api_key and not (scheme.lower() == "bearer" and secrets.compare_digest(given, key)):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key",
                           code="invalid_api_key")  # fmt: skip

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "charlm"}

    async def models(request: HttpRequest) -> Response:
        try:
            authorise(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [card(name) for name in engines]})

    async def model(request: HttpRequest) -> Response:
        try:
            authorise(request)
            return JSONResponse(card(_model(request.path_params["model"], engines)))
        except ApiError as exc:
            return exc.response()

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
            ask = _parse(body, engines, limits)
        except ApiError as exc:
            return exc.response()
        loop = asyncio.get_running_loop()
        queue = _Pieces()
        rows = []
        for p, prompt in enumerate(ask.prompts):
            for j in range(ask.n):
                index = p * ask.n + j
                seed = None if ask.config.seed is None else ask.config.seed + j
                config = dataclasses.replace(ask.config, seed=seed)
                rows.append(Request(prompt, config, Sink(loop, queue, index)))
        try:
            engines[ask.model].submit(rows)
        except TooLarge as exc:
            return ApiError(400, str(exc), param="n").response()
        except Busy as exc:
            return ApiError(429, str(exc), "rate_limit_exceeded", code="rate_limit_exceeded").response()
        ident, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": now, "model": ask.model}
        if ask.stream:
            events = _events(queue, rows, ask, head, stream_interval)
            return StreamingResponse(events, media_type="text/event-stream")
        collect = asyncio.ensure_future(_collect(queue, len(rows)))
        gone = asyncio.ensure_future(_gone(request))
        try:  # a client that goes away frees its rows at the next step, as a stream's does
            await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collect.cancel()
            for row in rows:
                row.cancelled.set()
        if not collect.done():  # (cancelled above, but not yet run to its end)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        texts, reasons = collect.result()
        failed = next((r for r in reasons if r and r.startswith("error")), None)
        if failed is not None:
            return _failure(failed).response()
        echo = [ask.prompts[i // ask.n] if ask.echo else "" for i in range(len(rows))]
        choices = [
            {"text": echo[i] + texts[i], "index": i, "logprobs": None, "finish_reason": reasons[i]}
            for i in range(len(rows))
        ]
        return JSONResponse(head | {"choices": choices, "usage": _usage(rows, ask.n)})

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", page, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http, Exception: _internal},
    )


async def _http(request: HttpRequest, exc: Exception) -> Response:
    """An unknown path or a wrong method: OpenAI's error shape too."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    what = {404: f"no such path: {path}", 405: f"{path} does not take {request.method}"}
    response = ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail))).response()
    response.headers.update(exc.headers or {})
    return response


async def _internal(request: HttpRequest, exc: Exception) -> Response:
    """A failure of the server itself: still OpenAI's error shape, and no traceback to the client."""
    return ApiError(500, "internal error", "server_error").response()


def _failure(reason: str) -> ApiError:
    """The engine's ``error: ...`` finish as an API error: the server's fault, since a request that
    could fail is refused before it reaches the engine."""
    return ApiError(500, reason.removeprefix("error: "), "server_error")


def _usage(rows: list[Request], n: int) -> dict[str, int]:
    """Tokens used: a prompt counts once, however many choices (``n``) it has, as OpenAI counts it."""
    prompt = sum(r.prompt_tokens for r in rows[::n])
    completion = sum(r.completion_tokens for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _gone(request: HttpRequest) -> None:
    """Return once the client has gone. Its body has been read, so the next message is the
    disconnect (uvicorn sends it when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    queue: _Pieces, rows: list[Request], ask: _Ask, head: dict[str, Any], interval: float
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: chunks of text per choice, a last one per choice
    with its finish reason, then ``[DONE]``. A chunk goes out at most every ``interval`` seconds,
    with every piece that is waiting by then (one event per choice, not per token), so a busy
    server spends its time generating rather than writing to sockets; the first chunk, and a
    choice's last, go out at once (a request is over when its text is). A client that goes away
    frees its rows at the next step: Starlette cancels this generator when uvicorn reports the
    disconnect, even while it waits (Starlette listens for it where the server speaks ASGI 2.3,
    as uvicorn does; under 2.4 it would notice only at the next write, which
    test_a_stream_sends_what_it_has_at_most_every_interval catches). A failure of the engine is an
    error event, as OpenAI sends one mid-stream (its client raises it), and ends the stream. With
    ``stream_options.include_usage`` every chunk has "usage": null and a last one, with no
    choices, has the usage."""
    loop = asyncio.get_running_loop()
    done, last = 0, -math.inf
    usage: dict[str, Any] = {"usage": None} if ask.include_usage else {}

    def event(choices: list[dict[str, Any]]) -> str:
        return f"data: {json.dumps(head | {'choices': choices} | usage)}\n\n"

    try:
        if ask.echo:
            yield "".join(event([{"text": ask.prompts[i // ask.n], "index": i, "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(rows)))  # fmt: skip
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
                    finished[index] = finish
            failed = next((f for f in finished.values() if f.startswith("error")), None)
            if failed is not None:
                yield f"data: {json.dumps(_failure(failed).body())}\n\n"
                return
            events = [
                event([{"text": "".join(p), "index": i, "logprobs": None, "finish_reason": finished.get(i)}])
                for i, p in texts.items()
            ]
            done += len(finished)
            yield "".join(events)
        if ask.include_usage:
            usage = {"usage": _usage(rows, ask.n)}
            yield event([])
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled.set()


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body(), parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and NaN (see _not_json)
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _not_json(constant: str) -> float:
    """Python's json reads NaN and Infinity, which JSON has not (and which pass range checks)."""
    raise ValueError(f"{constant} is not a JSON value")


def _model(name: str, engines: Mapping[str, Engine]) -> str:
    if name not in engines:
        raise ApiError(404, f"the model '{name}' does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")  # fmt: skip
    return name


def _unicode(texts: list[str], param: str) -> None:
    """Strings a tokenizer can take: JSON's \\ud800 escapes give Python lone surrogates, which
    UTF-8 cannot encode."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{param}' is not valid Unicode (a lone surrogate)", param=param) from None


@dataclass(frozen=True)
class _Ask:
    """A completions request, checked."""

    model: str
    prompts: list[str]
    config: SampleConfig
    n: int
    stream: bool
    echo: bool
    include_usage: bool


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    return value


def _parse(body: dict[str, Any], engines: Mapping[str, Engine], limits: Limits) -> _Ask:
    """The request's fields, checked: whatever could fail in the engine is refused here, with a 4xx."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    for param, off in UNSUPPORTED.items():
        if not any(body.get(param) == value and type(body.get(param)) is type(value) for value in off):
            raise ApiError(400, f"'{param}' is not supported by this server", param=param)
    name = _field(body, "model", (str,), None)
    if name is None:
        raise ApiError(400, "'model' is required", param="model")
    _model(name, engines)
    prompt = _field(body, "prompt", (str, list), "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
    if any(len(p) > limits.max_prompt_chars for p in prompts):
        raise ApiError(400, f"a prompt is longer than {limits.max_prompt_chars} characters", param="prompt")
    _unicode(prompts, "prompt")
    max_tokens = _field(body, "max_tokens", (int,), 16)
    n = _field(body, "n", (int,), 1)
    stop = _field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    seed = _field(body, "seed", (int,), None)
    rows = limits.max_n * 4
    checks = [
        (1 <= max_tokens <= limits.max_tokens, "max_tokens", f"between 1 and {limits.max_tokens}"),
        (1 <= n <= limits.max_n, "n", f"between 1 and {limits.max_n}"),
        (len(prompts) * n <= rows, "n", f"such that prompts x n is at most {rows}, not {len(prompts)} x {n}"),
        (all(isinstance(s, str) for s in stops) and len(stops) <= 4, "stop", "a string or up to 4 strings"),
        # a choice j samples with seed + j, into a 64-bit generator seed
        (seed is None or -(2**63) <= seed <= 2**64 - n, "seed", f"between -2**63 and 2**64 - {n}"),
    ]
    for ok, param, what in checks:
        if not ok:
            raise ApiError(400, f"'{param}' must be {what}", param=param)
    _unicode(stops, "stop")
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
            seed=seed,
        )
    except ConfigError as exc:
        message = str(exc)
        for flag in ("top-p", "top-k", "min-p", "repetition-penalty"):
            message = message.replace(f"--{flag}", flag.replace("-", "_"))
        raise ApiError(400, message) from None
    options = _field(body, "stream_options", (dict,), {})
    include_usage = _field(options, "include_usage", (bool,), False)
    if set(options) - {"include_usage", "include_obfuscation"}:  # the latter: nothing to obfuscate here
        what = "'stream_options' takes include_usage and include_obfuscation"
        raise ApiError(400, what, param="stream_options")
    return _Ask(name, prompts, config, n, bool(_field(body, "stream", (bool,), False)),
                bool(_field(body, "echo", (bool,), False)), include_usage)  # fmt: skip
