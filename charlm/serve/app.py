"""The HTTP face: the shape of OpenAI's completions and chat completions APIs on Starlette, over
one engine per run served (:class:`~charlm.serve.streams.Generates`). The requests are declared in
:mod:`charlm.serve.protocol`; here are the routes, which turn a request into rows of the engine
and its text into OpenAI's responses and server-sent events. Bad requests get a 4xx with an
OpenAI-style JSON error, never a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.config import SampleConfig
from charlm.generation.transcript import DEFAULT_FORMAT, ChatFormat
from charlm.serve.protocol import ApiError, ChatRequest, CompletionRequest, Limits, Sampling, parse
from charlm.serve.streams import Busy, Generates, Request, Sink, TooLarge

__all__ = ["STREAM_INTERVAL", "ApiError", "Limits", "create_app"]

# A stream's chunks go out at most this often (seconds): what a stream generated in between goes
# out in one chunk. A chunk costs the server a socket write (the most of its time per chunk under
# load, measured), so a write per token per stream spent a third of the event loop's busy time on
# writes at 32 streams; 10 ms is below what a reader can see and far under the 50 ms inter-token
# target.
STREAM_INTERVAL = 0.01


def create_app(
    engines: Mapping[str, Generates],
    api_key: str | None = None,
    limits: Limits | None = None,
    stream_interval: float = STREAM_INTERVAL,
    chat_format: ChatFormat = DEFAULT_FORMAT,
) -> Starlette:
    """The ASGI app serving ``engines`` by model id. ``stream_interval``: the least time between
    two chunks of one stream (its first goes out at once). ``chat_format``: how the chat
    endpoint writes a conversation's messages as the text the model reads."""
    limits = limits or Limits()
    created = int(time.time())
    reply_end = (chat_format.reply_end,) if chat_format.reply_end else ()

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
        # 503 where a model's engine has ended: its requests fail until the server is restarted,
        # which is what a supervisor polling this needs to know
        ended = [name for name, engine in engines.items() if not engine.alive]
        figures = {"models": list(engines), "active": {n: e.active for n, e in engines.items()}}
        if ended:
            return JSONResponse({"status": "error", "ended": ended, **figures}, status_code=503)
        return JSONResponse({"status": "ok", **figures})

    async def page(request: HttpRequest) -> Response:
        return HTMLResponse(resources.files("charlm.serve").joinpath("page.html").read_text(encoding="utf-8"))

    async def completions(request: HttpRequest) -> Response:
        try:
            authorise(request)
            ask: CompletionRequest = parse(CompletionRequest, await _json_body(request), limits)
            _model(ask.model, engines)
            config = ask.config(limits)
        except ApiError as exc:
            return exc.response()
        shape = _Completions(ask.prompt, ask.n, ask.echo)
        return await _answer(request, engines[ask.model], ask, ask.prompt, config, shape, stream_interval)

    async def chat(request: HttpRequest) -> Response:
        try:
            authorise(request)
            ask: ChatRequest = parse(ChatRequest, await _json_body(request), limits)
            _model(ask.model, engines)
            config = ask.config(limits, stop=reply_end)
        except ApiError as exc:
            return exc.response()
        prompt = chat_format.prompt(ask.turns)
        return await _answer(request, engines[ask.model], ask, [prompt], config, _Chat(), stream_interval)

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", page, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http, Exception: _internal},
    )


class _Completions:
    """The shape of OpenAI's completions: a choice's ``text``; with ``echo``, its prompt first."""

    kind = chunk_kind = "text_completion"
    prefix = "cmpl-"

    def __init__(self, prompts: Sequence[str], n: int, echo: bool) -> None:
        self.prompts, self.n, self.echo = prompts, n, echo

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        """Choice ``index`` of a whole response."""
        echoed = self.prompts[index // self.n] if self.echo else ""
        return self.piece(index, echoed + text, finish)

    def piece(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        """Choice ``index``'s part of a stream's chunk."""
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def prelude(self, count: int) -> list[dict[str, Any]]:
        """The choices' parts of the chunks a stream starts with (with ``echo``, the prompts)."""
        return [self.piece(i, self.prompts[i // self.n], None) for i in range(count)] if self.echo else []


class _Chat:
    """The shape of OpenAI's chat completions: a choice's ``message``, streamed as ``delta``s, the
    first of each choice with its role."""

    kind, chunk_kind = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl-"

    def __init__(self) -> None:
        self._started: set[int] = set()  # the choices whose role a stream has sent

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

    def piece(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text} if text else {}
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", "content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def prelude(self, count: int) -> list[dict[str, Any]]:
        return []


_Shape = _Completions | _Chat


async def _answer(
    request: HttpRequest,
    engine: Generates,
    ask: Sampling,
    prompts: Sequence[str],
    config: SampleConfig,
    shape: _Shape,
    interval: float,
) -> Response:
    """Generate ``ask.n`` choices of each prompt (choice j with seed + j) as rows of ``engine``,
    and answer in ``shape``: one response, or server-sent events with ``ask.stream``."""
    loop = asyncio.get_running_loop()
    queue = _Pieces()
    rows = []
    for p, prompt in enumerate(prompts):
        for j in range(ask.n):
            seed = None if config.seed is None else config.seed + j
            rows.append(
                Request(prompt, dataclasses.replace(config, seed=seed), Sink(loop, queue, p * ask.n + j))
            )
    try:
        engine.submit(rows)
    except TooLarge as exc:
        return ApiError(400, str(exc), param="n").response()
    except Busy as exc:
        return ApiError(429, str(exc), "rate_limit_exceeded", code="rate_limit_exceeded").response()
    head = {"id": f"{shape.prefix}{uuid.uuid4().hex[:24]}", "object": shape.kind, "created": int(time.time()),
            "model": ask.model}  # fmt: skip
    if ask.stream:
        head["object"] = shape.chunk_kind
        events = _events(queue, rows, shape, head, interval, ask.n, ask.include_usage)
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
    choices = [shape.choice(i, texts[i], reasons[i]) for i in range(len(rows))]
    return JSONResponse(head | {"choices": choices, "usage": _usage(rows, ask.n)})


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
    queue: _Pieces,
    rows: list[Request],
    shape: _Shape,
    head: dict[str, Any],
    interval: float,
    n: int = 1,
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: chunks of text per choice (in ``shape``), a last
    one per choice with its finish reason, then ``[DONE]``. A chunk goes out at most every
    ``interval`` seconds, with every piece that is waiting by then (one event per choice, not per
    token), so a busy server spends its time generating rather than writing to sockets; the first
    chunk, and a choice's last, go out at once (a request is over when its text is). A client
    that goes away frees its rows at the next step: Starlette cancels this generator when uvicorn
    reports the disconnect, even while it waits (Starlette listens for it where the server speaks
    ASGI 2.3, as uvicorn does; under 2.4 it would notice only at the next write, which
    test_a_stream_sends_what_it_has_at_most_every_interval catches). A failure of the engine is
    an error event, as OpenAI sends one mid-stream (its client raises it), and ends the stream.
    With ``include_usage`` every chunk has "usage": null and a last one, with no choices, has the
    usage (a prompt's tokens counted once for its ``n`` choices)."""
    loop = asyncio.get_running_loop()
    done, last = 0, -math.inf
    usage: dict[str, Any] = {"usage": None} if include_usage else {}

    def event(choices: list[dict[str, Any]]) -> str:
        return f"data: {json.dumps(head | {'choices': choices} | usage)}\n\n"

    try:
        prelude = shape.prelude(len(rows))
        if prelude:
            yield "".join(event([choice]) for choice in prelude)
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
            done += len(finished)
            yield "".join(event([shape.piece(i, "".join(p), finished.get(i))]) for i, p in texts.items())
        if include_usage:
            usage = {"usage": _usage(rows, n)}
            yield event([])
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled.set()


async def _json_body(request: HttpRequest) -> Any:
    try:
        body = json.loads(await request.body(), parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and NaN (see _not_json)
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    return body


def _not_json(constant: str) -> float:
    """Python's json reads NaN and Infinity, which JSON has not (and which pass range checks)."""
    raise ValueError(f"{constant} is not a JSON value")


def _model(name: str, engines: Mapping[str, Generates]) -> str:
    if name not in engines:
        raise ApiError(404, f"the model '{name}' does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")  # fmt: skip
    return name
