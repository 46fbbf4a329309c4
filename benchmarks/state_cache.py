"""The state cache of ``charlm serve``: time to the first token of a conversation's tenth turn.

    python benchmarks/state_cache.py [--turns 10] [--turn-tokens 200] [--rounds 5] [--cell lstm]

Trains a run of the default model (or ``--cell``, ``--layers``, ``--hidden``) for one step on
CPython's own documentation (the weights do not change the cost of reading), and starts two
``charlm serve`` on free loopback ports: one with the state cache (``--state-cache 64``), one
without (``--state-cache 0``). Each round holds a conversation with the cached server through the
official client's ``chat.completions``: ``--turns`` - 1 turns of a user message of
``--turn-tokens`` characters of the corpus (a token each: the run's tokenizer is by character) and
the server's reply of as many tokens, so its cache holds what a real conversation leaves there
(the servers' chat format ends a reply at a line ``<end>``, which the model does not say, so that
every reply has its full length: a blank line, the default end, cut them short). Then the tenth
user message is sent, streaming, to both servers (in turn, the order alternating between rounds),
and the time to the first chunk with text is measured: without the cache the server reads the
whole transcript, with it only the new message. Prints the medians over the rounds and one JSON object.

Both servers and the client share this machine's CPU: run it on an idle machine for figures to
quote.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

import charlm
from charlm.data.prepare import builtin_corpus
from charlm.generation.chat import ChatFormat

# a reply ends at a string an untrained model does not say: every reply has --turn-tokens tokens
FORMAT = ChatFormat(assistant="{content}\n<end>\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(run: Path, cache_mb: float, chat_format: Path) -> tuple[subprocess.Popen[bytes], openai.OpenAI]:
    """``charlm serve RUN --state-cache cache_mb`` on a free port, and a client of it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", str(run), "--port", str(port), "--device", "cpu",
         "--state-cache", str(cache_mb), "--chat-format", str(chat_format)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    return server, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def first_token(client: openai.OpenAI, model: str, messages: list[dict[str, str]], seed: int) -> float:
    """Seconds from sending ``messages`` to the first chunk of the reply with text."""
    began = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=20, seed=seed,
                                            stream=True)  # fmt: skip
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return time.perf_counter() - began
    finally:
        stream.close()
    return time.perf_counter() - began  # a reply with no text: its end


def conversation(client: openai.OpenAI, model: str, lines: list[str], tokens: int, seed: int) -> list[dict]:
    """The messages of a conversation of ``lines`` (all but the last answered by the server)."""
    messages: list[dict[str, str]] = []
    for turn, line in enumerate(lines):
        messages.append({"role": "user", "content": line})
        if turn < len(lines) - 1:
            done = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens,
                                                  seed=seed + turn)  # fmt: skip
            messages.append({"role": "assistant", "content": done.choices[0].message.content or ""})
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=10, help="the turn whose first token is timed")
    parser.add_argument("--turn-tokens", type=int, default=200, help="tokens of each message")
    parser.add_argument("--rounds", type=int, default=5, help="conversations; figures are medians")
    parser.add_argument("--cell", default=None, help="default: charlm train's")
    parser.add_argument("--layers", type=int, help="default: the cell's")
    parser.add_argument("--hidden", type=int, help="default: the cell's")
    args = parser.parse_args()
    text = " ".join(builtin_corpus().split())  # no blank line: it would end a reply
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.txt"
        corpus.write_text(builtin_corpus(), encoding="utf-8")
        shape = {k: v for k, v in (("cell", args.cell), ("layers", args.layers), ("hidden", args.hidden),
                                   ("embed", args.hidden)) if v is not None}  # fmt: skip
        run = charlm.train(corpus, out=Path(tmp) / "run", max_steps=1, device="cpu", **shape).run_dir
        tokenizer = charlm.load(run, device="cpu").run.tokenizer
        chat_format = Path(tmp) / "format.json"
        chat_format.write_text(json.dumps({"assistant": FORMAT.assistant}), encoding="utf-8")
        cached, with_cache = start(run, 64, chat_format)
        plain, without = start(run, 0, chat_format)
        try:
            timed: dict[str, list[float]] = {"cache": [], "no cache": []}
            read: list[int] = []
            n = args.turn_tokens
            for r in range(args.rounds):
                at = (r * args.turns * n * 7) % (len(text) - args.turns * n)
                lines = [text[at + i * n : at + (i + 1) * n] for i in range(args.turns)]
                messages = conversation(with_cache, run.name, lines, n, seed=r)
                turns = [(m["role"], m["content"]) for m in messages]
                read.append(len(tokenizer.encode(FORMAT.prompt(turns))))
                order = [("cache", with_cache), ("no cache", without)]
                for name, client in order if r % 2 == 0 else order[::-1]:
                    timed[name].append(first_token(client, run.name, messages, seed=r))
        finally:
            for server in (cached, plain):
                server.terminate()
                server.wait(timeout=30)
    median = {name: statistics.median(values) * 1000 for name, values in timed.items()}
    print(f"turn {args.turns} of conversations of {n}-token messages ({statistics.median(read)} tokens "
          f"of transcript, median), {args.rounds} rounds, time to first token (median):")  # fmt: skip
    for name, ms in median.items():
        print(f"  {name:>8}: {ms:8.1f} ms   (rounds: {', '.join(f'{v * 1000:.1f}' for v in timed[name])})")
    print(f"  speed-up: {median['no cache'] / median['cache']:.1f}x")
    print(json.dumps({"turn": args.turns, "turn_tokens": n, "transcript_tokens": statistics.median(read),
                      "rounds": args.rounds, "ttft_ms": median, "cell": args.cell or "default"}))  # fmt: skip


if __name__ == "__main__":
    main()
