"""charlm serve's chat completions: messages written as charlm chat's transcript (or a run's own
format), driven by the official client, streaming and not; and the request schema's errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

import charlm
from charlm.config import SampleConfig
from charlm.errors import ConfigError
from charlm.generation.chat import DEFAULT_FORMAT, DEFAULT_STOP, ChatFormat, Conversation
from charlm.serve.protocol import config_error
from tests.conftest import invoke
from tests.test_serve import NAMED, Running

QA = ChatFormat(user="Q: {content}\n", assistant="A: {content}\n\n")


@pytest.fixture()
def server(trained_run: Path) -> Iterator[Running]:
    running = Running(trained_run)
    yield running
    running.close()


def test_the_openai_client_s_chat_completions_work_unchanged(server: Running, trained_run: Path) -> None:
    """A reply to one line is what charlm chat (the library's conversation) says to it for the
    seed; streamed, the same text in deltas, the first with the role."""
    client = server.client()
    done = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=40, seed=3, temperature=0.9
    )
    choice = done.choices[0]
    assert done.object == "chat.completion" and choice.message.role == "assistant"
    model = charlm.load(trained_run, device="cpu")
    said = "".join(model.conversation(seed=3, temperature=0.9, length=40).reply("Hello"))
    assert choice.message.content == said
    assert choice.finish_reason in ("stop", "length") and done.usage.prompt_tokens == len("Hello\n")
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=40, seed=3, temperature=0.9,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == said
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_a_conversation_is_written_as_charlm_chat_s_transcript(server: Running, trained_run: Path) -> None:
    """System, user and assistant messages are the text the library's ChatFormat writes, and a
    reply is the continuation of that text for the seed, ending at a blank line; a last
    assistant message is continued; n choices take seed + j; content may be text parts."""
    client = server.client()
    model = charlm.load(trained_run, device="cpu")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": [{"type": "text", "text": "And a "}, {"type": "text", "text": "dict?"}]},
    ]
    prompt = "You are terse.\n\nWhat is a list?\nA sequence.\n\nAnd a dict?\n"
    turns = [(m["role"], m["content"]) for m in messages[:3]] + [("user", "And a dict?")]
    assert DEFAULT_FORMAT.prompt(turns) == prompt
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, seed=5, n=2)
    for j, choice in enumerate(done.choices):
        expected = model.sample(prime=prompt, length=60, temperature=1.0, seed=5 + j, stop=DEFAULT_STOP)
        assert choice.index == j and choice.message.content == expected
        assert "\n\n" not in choice.message.content
    # the assistant's last message is continued, not answered
    started = [*messages[:2], {"role": "assistant", "content": "It is"}]
    go_on = client.chat.completions.create(model="tiny", messages=started, max_tokens=30, seed=1, stop=["."])
    expected = model.sample(prime="You are terse.\n\nWhat is a list?\nIt is", length=30, temperature=1.0,
                            seed=1, stop=["\n\n", "."])  # fmt: skip
    assert go_on.choices[0].message.content == expected


def test_a_run_s_own_chat_format(trained_run: Path, tmp_path: Path) -> None:
    """A format given at serve time writes the messages its way, and its assistant template says
    where a reply starts and ends; charlm serve --chat-format reads it from a JSON file, and a
    bad one is one line naming the option."""
    running = Running(trained_run, chat_format=QA)
    try:
        messages = [{"role": "user", "content": "Hi"}]
        done = running.client().chat.completions.create(
            model="tiny", messages=messages, max_tokens=30, seed=2
        )
        model = charlm.load(trained_run, device="cpu")
        expected = model.sample(prime="Q: Hi\nA: ", length=30, temperature=1.0, seed=2, stop=["\n\n"])
        assert done.choices[0].message.content == expected
        config = SampleConfig(length=30, temperature=1.0, seed=2, stop=("\n\n",))
        talk = Conversation(model.network, model.run.tokenizer, config, chat_format=QA)  # the same format
        assert "".join(talk.reply("Hi")) == expected
    finally:
        running.close()
    for given, said in (
        ("{not json", "not JSON"),
        (json.dumps({"user": "Q: \n"}), '"user" must hold {content} once'),
        (json.dumps({"users": "{content}"}), 'keys "system", "user" and "assistant"'),
    ):
        path = tmp_path / "format.json"
        path.write_text(given, encoding="utf-8")
        result = invoke("serve", trained_run, "--chat-format", path, "--port", "0")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: --chat-format {path}: ") and said in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = invoke("serve", trained_run, "--state-cache", "-1")
    assert result.exit_code == 2 and "error: --state-cache must not be negative" in result.output


def test_the_chat_format_and_the_conversation_agree() -> None:
    """The default format is charlm chat's: a line and a newline, a reply ending at a blank line
    (the conversation's stop string); a template must hold {content} once."""
    assert DEFAULT_FORMAT.turn("Hello") == "Hello\n" and DEFAULT_STOP == (DEFAULT_FORMAT.reply_end,) == (
        "\n\n",
    )
    assert QA.reply_start == "A: " and QA.reply_end == "\n\n"
    assert QA.prompt([("user", "a{b}"), ("assistant", "c"), ("user", "d")]) == "Q: a{b}\nA: c\n\nQ: d\nA: "
    with pytest.raises(ConfigError) as refused:
        ChatFormat(assistant="{content} and {content}")
    assert refused.value.fields == ("assistant",)


def test_bad_chat_requests_get_openai_errors_naming_the_field(server: Running) -> None:
    url = f"{server.url}/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]
    cases = [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages.[0].role"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800"}]}, "messages.[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
         "messages.[0].tool_calls"),
        ({"model": "tiny", "messages": hello, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"model": "tiny", "messages": hello, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": hello, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": hello, "n": 17}, "n"),
        ({"model": "tiny", "messages": hello, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny", "messages": hello, "logprobs": True}, "logprobs"),
        ({"model": "tiny", "messages": hello, "tools": [{"type": "function"}]}, "tools"),
        ({"model": "tiny", "messages": hello, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "tiny", "messages": hello, "temprature": 1}, "temprature"),
        ({"model": "tiny", "messages": hello, "top_p": 0}, NAMED and "top_p"),
        ({"model": "tiny", "messages": hello, "min_p": 1.5}, NAMED and "min_p"),
    ]  # fmt: skip
    for body, param in cases:
        reply = httpx.post(url, content=json.dumps(body), timeout=30)  # ASCII: a lone surrogate too
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], reply.text
        if param:
            assert error["param"] == param, (body, error)
    assert httpx.post(url, json={"model": "nope", "messages": hello}).status_code == 404
    # OpenAI's "off" values and null fields are fine
    fine = {"model": "tiny", "messages": hello, "max_tokens": 2, "logprobs": False, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}, "temperature": None,
            "user": "me"}  # fmt: skip
    assert httpx.post(url, json=fine, timeout=30).status_code == 200
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "function", "content": "x",
                                                                         "name": "f"}])  # fmt: skip


def test_the_library_s_refusals_are_worded_as_the_request_s_fields() -> None:
    """A ConfigError names library fields; the server says them as JSON keys and sets param."""
    for field, key in (("length", "max_tokens"), ("num_samples", "n"), ("top_p", "top_p")):
        error = config_error(ConfigError(f"{{{field}}} must be positive, got 0", fields=(field,)))
        assert (error.status, error.param, error.message) == (400, key, f"{key} must be positive, got 0")
    unnamed = config_error(ConfigError("something is off"))
    assert unnamed.param is None and unnamed.message == "something is off"
