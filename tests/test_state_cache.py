"""The server's cache of states: a prompt that extends a kept one reads only its new tokens, and
what it reaches is what reading it whole reaches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import charlm
from charlm.config import Cell, ModelConfig, SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.generation.sampling import read
from charlm.model.network import RNNLM, Hidden
from charlm.serve import engine as engine_module
from charlm.serve.cache import ENTRY_OVERHEAD, StateCache
from charlm.serve.engine import Engine, Request
from tests.test_serve import Running


def _parts(hidden: Hidden) -> tuple[torch.Tensor, ...]:
    return hidden if isinstance(hidden, tuple) else (hidden,)


def test_the_cache_matches_tokens_not_text_and_keeps_the_recent_within_its_bytes() -> None:
    state = torch.zeros(2, 1, 4)  # 32 bytes
    cache = StateCache(10**6)
    cache.put([1, 2, 3], state, torch.zeros(5))
    assert cache.lookup([1, 2, 4, 5]) is None  # the text may share a prefix; the tokens do not
    assert cache.lookup([1, 2]) is None
    hit = cache.lookup([1, 2, 3, 7])
    assert hit is not None and hit.tokens == 3 and cache.tokens_saved == 3
    assert cache.lookup([1, 2, 3]) is hit  # whole: it knows the next token's scores
    cache.put([1, 2, 3, 7, 8], state, None)  # a reply's state: its scores are not known
    assert cache.lookup([1, 2, 3, 7, 8]) is hit  # so it does not serve the same ids whole ...
    assert cache.lookup([1, 2, 3, 7, 8, 9]).tokens == 5  # ... but does serve a longer prompt
    cache.put([1, 2, 3], state, None)  # does not replace an entry that knows its scores
    assert cache.lookup([1, 2, 3]).logits is not None
    # least recently used out, within its bytes
    size = 4 * 3 + 32 + ENTRY_OVERHEAD
    small = StateCache(2 * size)
    small.put([1, 2, 3], state, None)
    small.put([4, 5, 6], state, None)
    small.lookup([1, 2, 3, 0])  # now the most recent
    small.put([7, 8, 9], state, None)
    assert len(small) == 2 and small.bytes <= small.max_bytes
    assert small.lookup([4, 5, 6, 0]) is None and small.lookup([1, 2, 3, 0]) is not None
    off = StateCache(0)
    off.put([1], state, torch.zeros(5))
    assert len(off) == 0 and off.lookup([1, 2]) is None


@pytest.fixture(scope="module")
def tokenizer(trained_run: Path) -> Tokenizer:
    return charlm.load(trained_run, device="cpu").run.tokenizer


def _ask(engine: Engine, prompt: str, length: int, seed: int) -> str:
    """A request of ``engine``, its text once it has finished."""
    pieces: list[str] = []
    done = threading.Event()

    def emit(piece: str, finish: str | None) -> None:
        pieces.append(piece)
        if finish is not None:
            done.set()

    engine.submit([Request(prompt, SampleConfig(length=length, seed=seed, stop=("\n\n",)), emit)])
    assert done.wait(30)
    return "".join(pieces)


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of tokens of each read at once by the module (the engine's long reads)."""
    counted: list[int] = []
    real = engine_module.read

    def counting(model: RNNLM, tokenizer: Tokenizer, text: str, *args: object, **kwargs: object) -> object:
        counted.append(len(kwargs["ids"]))  # type: ignore[arg-type]
        return real(model, tokenizer, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "read", counting)
    yield counted


@pytest.mark.parametrize("cell", ["lstm", "gru", "mingru"])
def test_a_prompt_that_extends_a_kept_one_reads_only_its_new_tokens(
    cell: str, tokenizer: Tokenizer, reads: list[int]
) -> None:
    """The next turns of a conversation (the last prompt, the reply and a new line), short and
    long, start from the state kept after the last reply: what they reach (state and scores) is
    what reading them whole reaches, to 1e-5, and their text is the text of an engine without a
    cache, for the seed."""
    torch.manual_seed(0)
    network = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, cell=Cell(cell), layers=2, hidden=32)).eval()
    with torch.no_grad():  # an untrained model says byte tokens, whose text encodes otherwise:
        for token in range(tokenizer.vocab_size):  # the reply's tokens would not be the next prompt's
            if tokenizer.encode(tokenizer.decode([token])) != [token]:
                network.decoder.bias[token] = -50.0
    cached, plain = Engine(network, tokenizer), Engine(network, tokenizer, cache_bytes=0)
    cached.start()
    plain.start()
    try:
        prompt = "The first line of a talk.\n"
        for turn, line in enumerate(
            ["a short one\n", "a longer line, of more than sixty-four tokens: " * 3 + "\n"]
        ):
            reply = _ask(cached, prompt, 40, seed=turn)
            assert reply == _ask(plain, prompt, 40, seed=turn)
            prompt += reply + "\n\n" + line  # the transcript of the next turn
            ids = [tokenizer.newline_id, *tokenizer.encode(prompt)]
            kept = cached.cache.lookup(ids)  # what the next turn will start from: the reply's state
            assert kept is not None and kept.tokens >= len(ids) - len(tokenizer.encode(line)) - 3
            cached.cache.hits = 0
            reads.clear()
            assert _ask(cached, prompt, 40, seed=9) == _ask(plain, prompt, 40, seed=9)
            assert cached.cache.hits == 1  # it started from a kept state ...
            if len(ids) - kept.tokens > engine_module.PREFILL_TOKENS:  # ... and read the rest at once
                assert reads[0] == len(ids) - kept.tokens
            whole = read(network, tokenizer, prompt)
            after = cached.cache.lookup(ids)  # the state it reached after the prompt, kept
            assert after is not None and after.tokens == len(ids) and after.logits is not None
            torch.testing.assert_close(after.logits.float(), whole.logits.float(), atol=1e-5, rtol=0)
            for got, want in zip(_parts(after.hidden), _parts(whole.hidden), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        cached.stop()
        plain.stop()


def test_a_chat_s_next_turn_starts_from_the_last_reply_s_state(trained_run: Path) -> None:
    """Through HTTP with the official client: each turn of a conversation reads only its new
    line (the transcript before it is kept), and the replies are those of a server without a
    cache."""
    replies: dict[int, list[str]] = {}
    saved: dict[int, int] = {}
    for cache_bytes in (2**20, 0):
        running = Running(trained_run, cache_bytes=cache_bytes)
        try:
            client = running.client()
            messages: list[dict[str, str]] = []
            replies[cache_bytes] = []
            for turn in range(3):
                messages.append({"role": "user", "content": f"Line number {turn} of a talk."})
                done = client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=30, seed=turn
                )
                reply = done.choices[0].message.content
                replies[cache_bytes].append(reply)
                messages.append({"role": "assistant", "content": reply})
            saved[cache_bytes] = running.engine.cache.tokens_saved
        finally:
            running.close()
    assert replies[2**20] == replies[0]
    assert saved[0] == 0 and saved[2**20] > 2 * len("Line number 0 of a talk.\n")
