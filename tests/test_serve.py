"""charlm serve: the OpenAI completions API on a loopback port, driven by the official client."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import charlm
from charlm.config import SampleConfig
from charlm.errors import ConfigError
from charlm.generation.chat import DEFAULT_FORMAT, ChatFormat
from charlm.serve.app import STREAM_INTERVAL, Limits, _Completions, _events, _Pieces, create_app
from charlm.serve.engine import CACHE_BYTES, Engine, Request
from charlm.serve.process import EngineProcess
from tests.conftest import invoke


def _names_fields() -> bool:
    """Whether the library's sampling config names the field it refuses (``{top_p} must ...``):
    the server then words it as the request's JSON key and sets ``param``."""
    try:
        SampleConfig(top_p=0)
    except ConfigError as exc:
        return bool(exc.fields)
    return False


NAMED = _names_fields()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """A server in a thread of this process, on a free loopback port."""

    def __init__(
        self,
        run: Path,
        api_key: str | None = None,
        max_rows: int = 64,
        limits: Limits | None = None,
        stream_interval: float = STREAM_INTERVAL,
        chat_format: ChatFormat = DEFAULT_FORMAT,
        cache_bytes: int = CACHE_BYTES,
        process: bool = False,
    ):
        """``process``: the engine in a process of its own, as ``charlm serve`` runs it."""
        self.engine: Engine | EngineProcess
        if process:
            self.engine = EngineProcess(run, "best", "cpu", max_rows, cache_bytes)
        else:
            model = charlm.load(run, device="cpu")
            self.engine = Engine(model.network, model.run.tokenizer, max_rows, cache_bytes)
        self.engine.start()
        self.port = free_port()
        app = create_app({"tiny": self.engine}, api_key, limits, stream_interval, chat_format)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


@pytest.fixture()
def server(trained_run: Path) -> Iterator[Running]:
    running = Running(trained_run)
    yield running
    running.close()


def test_the_openai_client_works_unchanged(server: Running, trained_run: Path) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The ", max_tokens=40, seed=3, temperature=0.9)
    text = done.choices[0].text
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 40
    # the same code as charlm sample: the same seed gives the same text
    printed = invoke(
        "sample", trained_run, "--prime", "The ", "--length", "40", "--seed", "3", "--temp", "0.9"
    )
    assert printed.stdout == "The " + text + ("" if text.endswith("\n") else "\n")
    streamed = client.completions.create(model="tiny", prompt="The ", max_tokens=40, seed=3, temperature=0.9,
                                         stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_several_prompts_choices_and_stop_strings(server: Running) -> None:
    client = server.client()
    done = client.completions.create(
        model="tiny", prompt=["a", "b"], n=2, max_tokens=30, seed=1, stop=["e", "\n"]
    )
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    for choice in done.choices:
        assert "e" not in choice.text and "\n" not in choice.text
        assert choice.finish_reason in ("stop", "length")
    extra = client.completions.create(model="tiny", prompt="a", max_tokens=30, seed=1,
                                      extra_body={"min_p": 0.1, "top_k": 5})  # fmt: skip
    assert extra.choices[0].text


def test_concurrent_streams_are_rows_of_one_step(server: Running) -> None:
    """Eight streams at once: they all finish, and the engine stepped them together (far fewer
    steps than tokens)."""
    client = server.client()
    results: list[str] = []

    def one(seed: int) -> None:
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=100, seed=seed, stream=True)
        results.append("".join(c.choices[0].text for c in stream))

    before = server.engine.steps
    threads = [threading.Thread(target=one, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8
    assert server.engine.steps - before < 8 * 100 * 0.6  # rows shared steps


async def _next_chunk(events: AsyncIterator[str]) -> tuple[float, dict | None]:
    """(when, the event's JSON, or None for [DONE]) of the next chunk of ``_events``."""
    chunk = await asyncio.wait_for(anext(events), 10)
    data = chunk.removeprefix("data: ").strip()
    return time.perf_counter(), None if data == "[DONE]" else json.loads(data)


def test_chunks_go_out_an_interval_apart_and_a_choice_s_end_at_once() -> None:
    """The stream itself, fed as the engine feeds it: pieces every 5 ms go out an interval (50 ms)
    apart, all of them, the first at once; with a 30 s interval, a choice's end goes out at once,
    whether it arrives while the stream waits or while it is between chunks."""

    def request() -> Request:
        return Request("", SampleConfig(), lambda piece, finish: None)

    def shape(rows: int) -> _Completions:
        return _Completions([""] * rows, 1, echo=False)

    async def steady() -> None:
        queue = _Pieces()
        events = _events(queue, [request()], shape(1), {"id": "id"}, 0.05)

        async def engine() -> None:
            for i in range(100):
                queue.put_nowait((0, str(i % 10), None))
                await asyncio.sleep(0.005)
            queue.put_nowait((0, "", "length"))

        feeding = asyncio.create_task(engine())
        chunks = []
        # Timed in this task as each chunk is yielded (not through wait_for, whose task adds a loop
        # turn of scheduling delay to each timestamp, enough on a loaded machine to bring two
        # timestamps closer than the chunks were sent); steady() as a whole has the time limit.
        async for data in events:
            when, data = time.perf_counter(), data.removeprefix("data: ").strip()
            if data != "[DONE]":
                chunks.append((when, json.loads(data)))
        await feeding
        assert "".join(c[1]["choices"][0]["text"] for c in chunks) == "0123456789" * 10
        assert chunks[-1][1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) < 20  # not 100
        # Pieces come every 5 ms: a gap near 50 ms is the interval (5 ms of slack for
        # the work between the clock and the yield).
        assert all(b[0] - a[0] > 0.045 for a, b in itertools.pairwise(chunks[:-1]))

    async def ending() -> None:
        queue = _Pieces()
        events = _events(queue, [request(), request()], shape(2), {"id": "id"}, 30)
        queue.put_nowait((0, "a", None))
        start, first = await _next_chunk(events)  # at once
        assert first is not None and first["choices"][0]["text"] == "a"
        queue.put_nowait((0, "", "stop"))  # while the stream is between chunks
        when, second = await _next_chunk(events)
        assert second["choices"][0]["finish_reason"] == "stop" and when - start < 5
        queue.put_nowait((1, "b", None))  # held: the last chunk went out just now; the stream waits
        asyncio.get_running_loop().call_later(0.05, queue.put_nowait, (1, "c", "length"))
        when, last = await _next_chunk(events)  # the end cuts the wait short
        assert last["choices"][0] == {"text": "bc", "index": 1, "logprobs": None, "finish_reason": "length"}
        assert when - start < 5 and (await _next_chunk(events))[1] is None  # then [DONE]

    asyncio.run(asyncio.wait_for(steady(), 10))
    asyncio.run(ending())


def test_a_stream_sends_what_it_has_at_most_every_interval(trained_run: Path) -> None:
    """Through HTTP: the streamed text is the unstreamed text, in chunks; with a 30 s interval a
    stream still ends when its text does; and a client that goes away mid-wait frees its row when
    the server hears of it, not at the next write, 30 s on (a row of ten million tokens would
    run until then)."""
    running = Running(trained_run, stream_interval=0.1)
    try:
        client = running.client()
        whole = client.completions.create(model="tiny", prompt="x", max_tokens=2000, seed=2).choices[0].text
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=2000, seed=2, stream=True)
        texts = [chunk.choices[0].text for chunk in stream]
        assert "".join(texts) == whole and len(texts) < 2000 / 4
    finally:
        running.close()
    running = Running(trained_run, stream_interval=30, limits=Limits(max_tokens=10**7))
    try:
        client = running.client()
        start = time.perf_counter()
        chunks = list(client.completions.create(model="tiny", prompt="x", max_tokens=2000, stream=True))
        # the first chunk goes out at once (it may hold all 2,000 tokens where the engine is quick)
        assert (
            chunks[-1].choices[0].finish_reason == "length" and time.perf_counter() - start < 10
        )  # not 30 s
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=10**7, stream=True)
        next(iter(stream))  # the first chunk goes out at once; the next would wait 30 s
        stream.close()
        gone = time.perf_counter()
        while running.engine.active and time.perf_counter() < gone + 30:
            time.sleep(0.01)
        assert running.engine.active == 0 and time.perf_counter() - gone < 10  # not at the next write
    finally:
        running.close()


def test_shutting_down_gives_every_stream_one_finish(trained_run: Path) -> None:
    """drain() (SIGTERM, Ctrl-C) while rows finish on their own at every step: each stream gets
    exactly one finish, never a second one from the step under way (with n > 1 a second finish
    made a stream end before its last choice's text)."""
    model = charlm.load(trained_run, device="cpu")
    engine = Engine(model.network, model.run.tokenizer, 256)
    engine.start()
    lock, finishes = threading.Lock(), collections.Counter()

    def ends(key: tuple[int, int]) -> Callable[[str, str | None], None]:
        def emit(piece: str, finish: str | None) -> None:
            if finish is not None:
                with lock:
                    finishes[key] += 1

        return emit

    try:
        for trial in range(30):
            keys = [(trial, i) for i in range(24)]
            engine.submit(
                [Request("a", SampleConfig(length=1 + i % 7, seed=i), ends(k)) for i, k in enumerate(keys)]
            )
            time.sleep(0.0005 * (trial % 6))
            engine.drain()
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline and not all(finishes[k] for k in keys):
                time.sleep(0.001)
        time.sleep(0.05)  # a late second finish would show now
        assert len(finishes) == 30 * 24 and set(finishes.values()) == {1}, collections.Counter(
            finishes.values()
        )
    finally:
        engine.stop()


def test_a_stream_gets_the_same_text_alone_and_among_others(server: Running, trained_run: Path) -> None:
    """A prompt read as rows of the batched steps and one read at once both give charlm sample's
    text for the seed, and eight streams sharing the steps each get the text they get alone."""
    from charlm.serve.engine import PREFILL_TOKENS

    client = server.client()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12
    assert len(server.engine.tokenizer.encode(long_prompt)) > PREFILL_TOKENS  # read at once
    for prompt in (long_prompt, "def f"):
        printed = invoke("sample", trained_run, "--prime", prompt, "--length=30", "--seed=5", "--temp=1")
        text = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, seed=5).choices[0].text
        assert printed.stdout == prompt + text + ("" if text.endswith("\n") else "\n")
    prompts = [long_prompt, "a", "", "The cat", "xyz", "The ", long_prompt, "q"]
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=50, seed=i).choices[0].text
                for i, p in enumerate(prompts)]  # fmt: skip
    texts: dict[int, str] = {}

    def one(i: int) -> None:
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=50, seed=i,
                                           stream=True)  # fmt: skip
        texts[i] = "".join(c.choices[0].text for c in stream)

    before = server.engine.steps
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [texts[i] for i in range(len(prompts))] == expected
    assert server.engine.steps - before < 8 * 50 * 0.6  # the streams shared steps


def test_bad_requests_get_openai_errors_never_500(server: Running) -> None:
    url = f"{server.url}/v1/completions"
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"prompt": "a"}).encode(), 400, "model"),
        (json.dumps({"model": "nope", "prompt": "a"}).encode(), 404, "model"),
        (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"model": "tiny", "prompt": []}).encode(), 400, "prompt"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": "9"}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": True}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": 9}).encode(), 400, "temperature"),
        (json.dumps({"model": "tiny", "prompt": "a", "top_p": 0}).encode(), 400, NAMED and "top_p"),
        (json.dumps({"model": "tiny", "prompt": "a", "n": 0}).encode(), 400, "n"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop": [1]}).encode(), 400, "stop"),
        (json.dumps({"model": "tiny", "prompt": "a" * 200_000}).encode(), 400, "prompt"),
        # what Python's json reads but JSON has not, and what would fail only in the engine
        (b'{"model": "tiny", "prompt": "a", "repetition_penalty": NaN}', 400, None),
        (b'{"model": "tiny", "prompt": "a", "top_p": Infinity}', 400, None),
        (json.dumps({"model": "\ud800", "prompt": "a"}).encode(), 404, "model"),  # echoed in the message
        (json.dumps({"model": "tiny", "prompt": "a\ud800b"}).encode(), 400, "prompt"),
        (json.dumps({"model": "tiny", "prompt": "a", "stop": ["\udfff"]}).encode(), 400, "stop"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 10**30}).encode(), 400, "seed"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 2**64 - 1, "n": 2}).encode(), 400, "seed"),
        (json.dumps({"model": "tiny", "prompt": "a", "seed": 10**30, "stream": True}).encode(), 400, "seed"),
        (json.dumps({"model": "tiny", "prompt": ["a"] * 5, "n": 16}).encode(), 400, "n"),
        # a misspelt field, and OpenAI's fields that charlm does not do, are refused, not ignored
        (json.dumps({"model": "tiny", "prompt": "a", "temprature": 0.5}).encode(), 400, "temprature"),
        (json.dumps({"model": "tiny", "prompt": "a", "logprobs": 2}).encode(), 400, "logprobs"),
        (json.dumps({"model": "tiny", "prompt": "a", "logprobs": 0}).encode(), 400, "logprobs"),
        (json.dumps({"model": "tiny", "prompt": "a", "best_of": 3}).encode(), 400, "best_of"),
        (json.dumps({"model": "tiny", "prompt": "a", "suffix": "z"}).encode(), 400, "suffix"),
        (json.dumps({"model": "tiny", "prompt": "a", "logit_bias": {"5": 100}}).encode(), 400, "logit_bias"),
        (
            json.dumps({"model": "tiny", "prompt": "a", "stream_options": {"x": 1}}).encode(),
            400,
            "stream_options.x",
        ),
    ]
    for body, status, param in cases:
        reply = httpx.post(url, content=body, timeout=30)
        assert reply.status_code == status, (body[:60], reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"] and "Traceback" not in reply.text
        if param:
            assert error["param"] == param
    many = httpx.post(url, json={"model": "tiny", "prompt": ["a"] * 5, "n": 16})
    assert "64, not 5 x 16" in many.json()["error"]["message"]
    # their "off" values, and OpenAI's "user", are fine
    fine = {"model": "tiny", "prompt": "a", "max_tokens": 2, "logprobs": None, "best_of": 1, "logit_bias": {},
            "suffix": None, "user": "me", "seed": -(2**63)}  # fmt: skip
    assert httpx.post(url, json=fine, timeout=30).status_code == 200
    # an unknown path or method: OpenAI's error shape too
    for reply, status in ((httpx.get(f"{server.url}/v1/chat"), 404), (httpx.get(url), 405)):
        assert reply.status_code == status and reply.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="a")


def test_echo_usage_and_one_model(server: Running) -> None:
    """echo puts the prompt before the text; a prompt's tokens count once however many choices it
    has; stream_options.include_usage ends a stream with its usage; GET /v1/models/{id}."""
    client = server.client()
    done = client.completions.create(model="tiny", prompt=["ab", "c"], n=2, max_tokens=3, seed=1, echo=True)
    plain = client.completions.create(model="tiny", prompt=["ab", "c"], n=2, max_tokens=3, seed=1)
    prompts = ["ab", "ab", "c", "c"]
    assert [c.text for c in done.choices] == [p + c.text for p, c in zip(prompts, plain.choices, strict=True)]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 12)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=["ab", "c"],
            n=2,
            max_tokens=3,
            seed=1,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = collections.defaultdict(str)
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[i] for i in range(4)] == [c.text for c in done.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 15
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_failing_engine_is_the_server_s_error_not_a_quiet_stop(server: Running) -> None:
    """A failure in a step reaches the client: 500 in OpenAI's shape, or mid-stream an error event
    (which the official client raises), never an empty text that looks finished."""

    def fail(going: list) -> None:
        raise RuntimeError("the step failed")

    server.engine._advance = fail  # type: ignore[method-assign]
    client = server.client()
    with pytest.raises(openai.InternalServerError, match="the step failed"):
        client.completions.create(model="tiny", prompt="a", max_tokens=5)
    with pytest.raises(openai.APIError, match="the step failed"):
        list(client.completions.create(model="tiny", prompt="a", max_tokens=5, stream=True))


def test_a_client_that_leaves_a_plain_request_frees_its_rows(server: Running) -> None:
    """Not only a stream's: a request without stream whose client times out stops generating. (A
    step is made to take 1 ms at least, so its 4,096 tokens outlast the client's 0.5 s on any
    machine.)"""
    advance = server.engine._advance

    def slow(going: list) -> None:
        time.sleep(0.001)
        advance(going)

    server.engine._advance = slow  # type: ignore[method-assign]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=0.5,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 4096, "n": 16})  # fmt: skip
    gone = server.engine.steps
    deadline = time.perf_counter() + 30
    while server.engine.active and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert server.engine.active == 0 and server.engine.steps - gone < 500


def _before_reads(monkeypatch: pytest.MonkeyPatch, before: Callable[[str], None]) -> None:
    """Call ``before(text)`` as the engine reads a prompt at once (it may wait, count or raise)."""
    from charlm.serve import engine as engine_module

    real = engine_module.read

    def read(model: object, tokenizer: object, text: str, *args: object, **kwargs: object) -> object:
        before(text)
        return real(model, tokenizer, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "read", read)


def _slow_long_reads(monkeypatch: pytest.MonkeyPatch, seconds: float, error: Exception | None = None) -> None:
    """Make the engine's read of a prompt over 64 characters take ``seconds`` (then fail with
    ``error``, if given)."""

    def slow(text: str) -> None:
        if len(text) > 64:
            time.sleep(seconds)
            if error is not None:
                raise error

    _before_reads(monkeypatch, slow)


LONG = "The quick brown fox jumps over the lazy dog. " * 3


def test_a_prompt_being_read_ends_once_and_frees_its_place(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt in the prompt thread: its client's going frees its place at once (not after
    its read); shutdown gives it one finish, and its read ending later none; a failure of any kind
    in its read is its error, not a request that never ends; and a short prompt does not queue
    behind it, on the module's path (CUDA) too."""
    model = charlm.load(trained_run, device="cpu")
    _slow_long_reads(monkeypatch, 1.0)
    said: list[tuple[int, str, str | None]] = []

    def request(i: int, prompt: str = LONG, length: int = 5) -> Request:
        return Request(prompt, SampleConfig(length=length, seed=i), lambda p, f: said.append((i, p, f)))

    engine = Engine(model.network, model.run.tokenizer, max_rows=1)
    engine.start()
    try:
        gone = request(0)
        engine.submit([gone])
        time.sleep(0.2)
        gone.cancelled.set()
        assert engine.active == 0
        engine.submit([request(1)])  # its place is free: no Busy
        time.sleep(0.2)
        engine.drain()
        time.sleep(2.5)  # both reads are over
        assert sorted(s for s in said if s[2] is not None) == [(0, "", "stop"), (1, "", "stop")]  # once each
    finally:
        engine.stop()
    _slow_long_reads(monkeypatch, 0.1, KeyError("no such thing"))
    for stepper in (True, False):  # the CPU's stepper, and the module's path (as on CUDA)
        said.clear()
        engine = Engine(model.network, model.run.tokenizer)
        if not stepper:
            engine.stepper = None
        engine.start()
        try:
            engine.submit([request(2)])
            engine.submit([request(3, "a", 1)])
            deadline = time.perf_counter() + 10
            while engine.active and time.perf_counter() < deadline:
                time.sleep(0.01)
            finishes = [s for s in said if s[2] is not None]
            assert engine.active == 0 and finishes[0] == (3, "", "length"), said  # not behind the read
            assert finishes[1][0] == 2 and "no such thing" in str(finishes[1][2]) and len(finishes) == 2
        finally:
            engine.stop()


def test_a_long_prompt_of_n_choices_is_read_once(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """n choices of one long prompt are n rows of one text: it is read once (a 100,000-character
    prompt with n=16 was read 16 times), and each choice's text is what it is read alone."""
    reads: list[str] = []
    _before_reads(monkeypatch, reads.append)
    running = Running(trained_run)
    try:
        client = running.client()
        many = client.completions.create(model="tiny", prompt=LONG, n=4, max_tokens=30, seed=7)
        assert reads == [LONG]
        running.engine._last_read = None  # read again, alone
        for j, choice in enumerate(many.choices):
            alone = client.completions.create(model="tiny", prompt=LONG, max_tokens=30, seed=7 + j)
            assert choice.text == alone.choices[0].text
            running.engine._last_read = None
    finally:
        running.close()


def test_a_long_prompt_is_read_beside_the_streams(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt too long for the batched steps is read in a thread of its own: the streams being
    generated go on meanwhile (read between steps, a 100,000-character prompt stopped them for
    seconds), and its text is charlm sample's."""
    _before_reads(monkeypatch, lambda text: time.sleep(1.5))
    # A stream that outlasts the test: the tiny model makes 4,000 tokens in under half a second.
    running = Running(trained_run, limits=Limits(max_tokens=10**7))
    try:
        client = running.client()
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=10**7, stream=True)
        next(iter(stream))
        prompt = "The quick brown fox jumps over the lazy dog. " * 3
        results: list = []

        def ask() -> None:
            results.append(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, seed=4,
                                                     temperature=0.9))  # fmt: skip

        reader = threading.Thread(target=ask)
        reader.start()
        time.sleep(0.3)
        before = running.engine.steps
        time.sleep(0.8)  # the prompt is being read
        assert running.engine.steps - before > 50 and not results
        reader.join(timeout=30)
        stream.close()
        printed = invoke("sample", trained_run, "--prime", prompt, "--length", "20", "--seed", "4",
                         "--temp", "0.9")  # fmt: skip
        assert printed.stdout.rstrip("\n") == (prompt + results[0].choices[0].text).rstrip("\n")
    finally:
        running.close()


def test_too_many_streams_get_429(trained_run: Path) -> None:
    running = Running(trained_run, max_rows=1, limits=Limits(max_tokens=10**7))  # a stream that lasts
    try:
        client = running.client()
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=10**7, stream=True)
        next(iter(stream))  # one stream is generating
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="b", max_tokens=5)
        stream.close()  # the client goes away: its row is freed within a step
        deadline = time.time() + 10
        while running.engine.active and time.time() < deadline:
            time.sleep(0.05)
        assert running.engine.active == 0
        assert client.completions.create(model="tiny", prompt="b", max_tokens=5).choices[0].text is not None
        # more streams than the server ever runs at once: waiting would not help, so not a 429
        with pytest.raises(openai.BadRequestError, match="at most 1 at once"):
            client.completions.create(model="tiny", prompt="b", max_tokens=5, n=2)
    finally:
        running.close()


def test_an_api_key_is_required_when_set(trained_run: Path) -> None:
    running = Running(trained_run, api_key="s3cret")
    models = f"{running.url}/v1/models"
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").completions.create(model="tiny", prompt="a", max_tokens=3)
        assert running.client("s3cret").completions.create(model="tiny", prompt="a", max_tokens=3).choices
        assert httpx.get(f"{running.url}/health").status_code == 200  # health needs no key
        assert httpx.get(models).status_code == 401
        # the scheme's case does not matter (RFC 7235)
        assert httpx.get(models, headers={"Authorization": "bearer s3cret"}).status_code == 200
        # a key that is not ASCII: 401, not compare_digest's TypeError as a 500
        assert httpx.get(models, headers={"Authorization": b"Bearer s3cr\xe9t"}).status_code == 401
    finally:
        running.close()
    running = Running(trained_run, api_key="clé")
    try:  # a UTF-8 key works
        key = {"Authorization": "Bearer clé".encode()}
        assert httpx.get(f"{running.url}/v1/models", headers=key).status_code == 200
    finally:
        running.close()


def test_the_page_is_served(server: Running) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/completions" in page.text and "<textarea" in page.text


def start(trained_run: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", str(trained_run), "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(process.communicate()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_end_streams_properly_and_exit_0(trained_run: Path, sig: signal.Signals) -> None:
    # a stream far longer than the test: the tiny model wrote 4,000 tokens before a busy event
    # loop had sent its first chunk, and the stream was over before the signal
    process, port = start(trained_run, "--max-tokens", "1000000")
    events: list[str] = []

    def read() -> None:
        body = {"model": trained_run.name, "prompt": "a", "max_tokens": 1_000_000, "stream": True}
        try:
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60
            ) as reply:
                for line in reply.iter_lines():
                    if line:
                        events.append(line)
        except httpx.HTTPError as exc:  # shown by the assertions below
            events.append(f"client error: {exc!r}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.time() + 60
        while len(events) < 5 and time.time() < deadline:
            time.sleep(0.05)
        assert len(events) >= 5 and not events[-1].startswith("client error"), events
    finally:
        process.send_signal(sig)  # a failure above must not leave the server running
    reader.join(timeout=30)
    assert process.wait(timeout=30) == 0, process.communicate()[1]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "stop"
    assert "Traceback" not in process.communicate()[1]


def test_binding_beyond_loopback_without_a_key_warns(trained_run: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", str(trained_run), "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CHARLM_API_KEY": ""},
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    said = process.communicate()[1]
    assert "warning: serving on 0.0.0.0 without an API key" in said and "(set --api-key or" in said


def test_an_address_it_cannot_have_is_one_line_and_its_exit_code(trained_run: Path) -> None:
    """A taken port, a host that is not this machine's, an impossible port or limit: one line, the
    README's exit codes, and no "serving" line first (uvicorn's own bind logged and exited with 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, code, said in (
            (["--port", str(port)], 1, f"error: cannot listen on 127.0.0.1:{port}: "),
            (["--host", "999.1.1.1"], 1, "error: cannot listen on 999.1.1.1:8000"),
            (["--port", "99999"], 2, "error: --port must be between 0 and 65535"),
            (["--max-tokens", "0"], 2, "error: --max-tokens must be at least 1"),
        ):
            result = invoke("serve", trained_run, *args)
            assert result.exit_code == code, result.output
            assert said in result.output and "serving" not in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs it with apt-get)")
def test_the_page_generates_in_headless_chromium(trained_run: Path, tmp_path: Path) -> None:
    """The page in headless Chromium (driven by Playwright): type a prompt, click Generate, wait
    for the text to stream in, save a screenshot. The page shows what the API returns."""
    from playwright.sync_api import sync_playwright

    process, port = start(trained_run)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"{base}/")
            page.fill("#prompt", "The ")
            page.fill("#seed", "1")
            page.fill("#max_tokens", "60")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
            shown = page.text_content("#out")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            browser.close()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        expected = client.completions.create(
            model=trained_run.name, prompt="The ", max_tokens=60, seed=1, temperature=0.8
        )
        assert shown == "The " + expected.choices[0].text
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
