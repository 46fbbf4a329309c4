"""charlm serve's engine in a process of its own (charlm.serve.process): the texts, the usage, the
places and the failures of the engine in the server's process, and a child that never outlives
the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import httpx
import openai
import pytest

from charlm.errors import CheckpointError, ServeError
from charlm.serve.app import Limits
from charlm.serve.process import EngineProcess
from tests.conftest import invoke
from tests.test_serve import Running, free_port


@pytest.fixture(scope="module")
def both(trained_run: Path) -> Iterator[tuple[Running, Running]]:
    """The same run served with the engine in the server's process and in one of its own."""
    here, there = Running(trained_run), Running(trained_run, process=True)
    yield here, there
    here.close()
    there.close()


def test_the_same_texts_and_usage_as_in_the_server_s_process(both: tuple[Running, Running]) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 12  # read at once, not in the steps
    answers = []
    for running in both:
        client = running.client()
        said = []
        for i, prompt in enumerate(["", "The ", long_prompt]):
            plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, seed=i, n=2)
            said.append(([c.text for c in plain.choices], plain.usage.model_dump()))
            usage = {"include_usage": True}
            stream = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=40, seed=i, stream=True, stream_options=usage
            )
            chunks = list(stream)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            said.append((text, chunks[-1].usage.model_dump()))
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30, seed=3
        )
        said.append((chat.choices[0].message.content, chat.usage.model_dump()))
        answers.append(said)
    assert answers[0] == answers[1]
    assert any(text for text, _ in answers[1])


def test_a_full_engine_refuses_at_once_and_a_client_leaving_frees_its_place(trained_run: Path) -> None:
    running = Running(trained_run, max_rows=1, limits=Limits(max_tokens=10**7), process=True)
    try:
        client = running.client()
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=10**7, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="b", max_tokens=5)
        assert httpx.get(f"{running.url}/health").json()["active"] == {"tiny": 1}
        stream.close()
        deadline = time.time() + 10
        while running.engine.active and time.time() < deadline:
            time.sleep(0.05)
        assert running.engine.active == 0
        assert client.completions.create(model="tiny", prompt="b", max_tokens=5).usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError, match="at most 1 at once"):
            client.completions.create(model="tiny", prompt="b", max_tokens=5, n=2)
    finally:
        running.close()


def test_an_engine_process_that_dies_fails_its_requests_and_the_next(trained_run: Path) -> None:
    """A child killed mid-stream: the stream ends with an error event, a request after it is a 500,
    and nothing hangs."""
    running = Running(trained_run, limits=Limits(max_tokens=10**7), process=True)
    try:
        client = running.client()
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=10**7, stream=True)
        chunks = iter(stream)
        next(chunks)
        assert isinstance(running.engine, EngineProcess) and running.engine._process is not None
        running.engine._process.kill()
        with pytest.raises(openai.APIError, match="engine's process has ended"):
            for _ in chunks:
                pass
        with pytest.raises(openai.InternalServerError, match="engine's process has ended"):
            client.completions.create(model="tiny", prompt="b", max_tokens=5)
        assert running.engine.active == 0 and not running.engine.alive
        health = httpx.get(f"{running.url}/health")  # what a supervisor polls
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert health.json()["ended"] == ["tiny"]
    finally:
        running.close()


def test_a_run_the_engine_cannot_load_is_its_error(tmp_path: Path) -> None:
    """The child's own error, raised again by the server: the same class (so the same exit code)
    and the same fields, worded by each face."""
    engine = EngineProcess(tmp_path / "no-such-run", "best", "cpu", 4, 0)
    with pytest.raises(CheckpointError, match="no-such-run"):
        engine.start()
    said = invoke("serve", tmp_path / "no-such-run", "--port", "0")
    assert said.exit_code == 1 and said.stderr.strip() == f"error: run not found: {tmp_path / 'no-such-run'}"
    with pytest.raises(ServeError, match="did not start"):  # a child that says nothing in time
        slow = EngineProcess(tmp_path / "no-such-run", "best", "cpu", 4, 0)
        with mock.patch("charlm.serve.process.START_SECONDS", 0.01):
            slow.start()


def test_the_http_process_does_not_import_pytorch() -> None:
    """The server's own process only speaks HTTP: its memory is that of Starlette and uvicorn, not
    PyTorch's (about 190 MB), which the engines' processes hold."""
    modules = "charlm.cli.app, charlm.cli.serve, charlm.serve.server"
    code = f"import sys, {modules}; print(sorted({{'torch', 'numpy'}} & set(sys.modules)))"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert said.stdout.strip() == "[]"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):  # ended, not reaped
            return True
        time.sleep(0.1)
    return False


def _start(
    run: Path, *runs: Path, cwd: Path | None = None, ready: bool = True, deaf: bool = False
) -> tuple[subprocess.Popen[str], int]:
    """``charlm serve`` (the console script, as a user types it) in a session of its own, the
    group a terminal's Ctrl-C would reach; with ``ready``, once it answers. ``deaf``: started
    with SIGINT ignored, as a background job of a shell without job control is (and CI's
    processes may be)."""
    port = free_port()
    script = Path(sys.executable).with_name("charlm")
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN if deaf else signal.default_int_handler)
    try:  # a handler is not inherited: SIGINT's disposition in the server is its default, or ignored
        server = subprocess.Popen(
            [str(script), "serve", str(run), *map(str, runs), "--port", str(port), "--device", "cpu",
             "--max-tokens", "100000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    deadline = time.time() + 60
    while ready and time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return server, port


def _stream(port: int, model: str, events: list[str]) -> threading.Thread:
    """A long stream read in a thread, its events into ``events``."""

    def read() -> None:
        body = {"model": model, "prompt": "a", "max_tokens": 100_000, "stream": True}
        try:
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60
            ) as reply:
                events.extend(line for line in reply.iter_lines() if line)
        except httpx.HTTPError as exc:
            events.append(f"client error: {exc!r}")

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.time() + 30
    while len(events) < 3 and time.time() < deadline:
        time.sleep(0.05)
    return reader


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="reads a process's children from /proc"
)


@needs_proc
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c twice", "sigterm to both", "kill"])
def test_the_engine_s_process_ends_with_the_server(trained_run: Path, how: str) -> None:
    """Ctrl-C at the terminal reaches the server's process group, not its engine's process (a
    session of its own): the server ends the stream properly (its last chunk, then [DONE]), stops
    the engine and exits with 0, no traceback, pressed once or twice (the second forces uvicorn's
    exit). A SIGTERM to every process, as systemd sends it, does the same: the engine ignores it.
    A server killed outright leaves no engine behind: the child ends when the server's end of the
    pipe closes. A run given twice is one model, one engine."""
    server, port = _start(trained_run, trained_run.parent / ".." / trained_run.parent.name / trained_run.name)
    events: list[str] = []
    reader: threading.Thread | None = None
    try:
        children = _children(server.pid)
        assert len(children) == 1, children
        reader = _stream(port, trained_run.name, events)
        if how.startswith("ctrl-c"):
            os.killpg(server.pid, signal.SIGINT)
            if how == "ctrl-c twice":
                time.sleep(0.05)
                os.killpg(server.pid, signal.SIGINT)
        elif how == "sigterm to both":
            os.kill(children[0], signal.SIGTERM)
            os.kill(server.pid, signal.SIGTERM)
        else:
            server.kill()
        code = server.wait(timeout=30)
        reader.join(timeout=30)
        if how != "kill":
            assert code == 0
            assert events[-1] == "data: [DONE]", events[-3:]
            assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "stop"
        assert _gone(children[0], 20)
        assert "Traceback" not in server.communicate()[1]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.communicate()
        if reader is not None:
            reader.join(timeout=30)


@needs_proc
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c, started deaf to it", "kill"])
def test_stopping_the_server_while_its_engine_loads(trained_run: Path, how: str) -> None:
    """Ctrl-C before the server is up is "interrupted" and exit 130, even where the server
    started with SIGINT ignored (it loaded deaf to it, then served); a server killed then leaves
    an engine that, once loaded, finds nobody to tell and ends without a word."""
    server, _ = _start(trained_run, ready=False, deaf=how.endswith("deaf to it"))
    try:
        deadline = time.time() + 30
        while not _children(server.pid) and time.time() < deadline:
            time.sleep(0.02)
        child = _children(server.pid)[0]
        if how.startswith("ctrl-c"):
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.kill()
        try:
            said = server.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise AssertionError(f"still running 30 s later; it said {server.communicate()[1]!r}") from None
        if how.startswith("ctrl-c"):
            assert server.returncode == 130
        assert _gone(child, 30)
        assert "Traceback" not in said and "Error" not in said, said
        if how.startswith("ctrl-c"):
            assert said.strip().endswith("interrupted")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.communicate()


@needs_proc
def test_an_engine_that_ends_is_said_and_health_answers_503(trained_run: Path) -> None:
    """An engine killed behind the server's back: one line on the server's stderr, GET /health
    503 naming the model, its requests a 500 at once; the server still stops cleanly."""
    server, port = _start(trained_run)
    try:
        os.kill(_children(server.pid)[0], signal.SIGKILL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while httpx.get(f"{url}/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["ended"] == [trained_run.name]
        reply = httpx.post(f"{url}/v1/completions", json={"model": trained_run.name, "prompt": "a"})
        assert reply.status_code == 500 and "engine's process has ended" in reply.json()["error"]["message"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        said = server.communicate()[1]
        assert f"error: the engine of {trained_run.name} has ended (exit code -9)" in said
        assert "Traceback" not in said
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.communicate()


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="python -P (no working directory on the path) is 3.11's"
)
def test_a_module_in_the_working_directory_does_not_shadow_the_engine_s(
    trained_run: Path, tmp_path: Path
) -> None:
    """``charlm serve`` run where a user keeps a ``random.py`` of their own: the server's console
    script never imports it, and neither does its engine's process."""
    (tmp_path / "random.py").write_text("raise SystemExit('the working directory was imported')\n")
    server, port = _start(trained_run, cwd=tmp_path)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": trained_run.name, "prompt": "a", "max_tokens": 5})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        said = server.communicate()[1]
    assert "working directory was imported" not in said
