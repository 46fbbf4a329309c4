"""The batched sampler that sample, chat, bulk output and the server share: rows that join and leave
between steps, pickers shared by streams, and one seed giving one text through every face."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import Cell, ModelConfig, SampleConfig, TokenizerConfig
from charlm.data.tokenizer import Tokenizer, train_tokenizer
from charlm.generation.batch import RowDecoder, pick_tokens
from charlm.generation.rows import Rows
from charlm.generation.sampling import Picker, generate, make_generator, sample_all
from charlm.model.network import RNNLM
from charlm.model.stepper import Stepper
from charlm.serve.engine import PREFILL_TOKENS, Engine, Request

CELLS = ["lstm", "gru", "rnn", "irnn", "mingru", "minlstm"]


@pytest.fixture(scope="module")
def tokenizer(corpus_text: str) -> Tokenizer:
    return train_tokenizer(corpus_text, TokenizerConfig())


def tiny(cell: str, vocab: int, scale: float = 0.0) -> RNNLM:
    """A small model of ``cell`` with seeded weights (drawn at ``scale`` where given: larger
    weights make peaked distributions, as a trained model's)."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=vocab, cell=Cell(cell), layers=2, hidden=32, embed=32)).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, scale)
    return model


@pytest.mark.parametrize("fast", [True, False], ids=["stepper", "module"])
@pytest.mark.parametrize("cell", CELLS)
def test_rows_join_and_leave_between_steps(cell: str, fast: bool) -> None:
    """Streams joining (from nothing, or from a read text's state, several copies at once) and
    leaving between steps: every row's scores after every step are its stream's alone, as the
    module gives them for its tokens in one pass."""
    V = 50
    model = tiny(cell, V, 0.1 if cell == "irnn" else 0.3)
    rows = Rows(model, Stepper(model) if fast else None)
    gen = torch.Generator().manual_seed(1)
    seqs = {name: torch.randint(0, V, (16,), generator=gen) for name in "ABCDE"}
    seqs["E"][:3] = seqs["D"][:3]  # D and E join as two copies of one read state

    def expected(name: str, fed: int) -> torch.Tensor:  # (V,) after the stream's first `fed` tokens
        with torch.no_grad():
            logits, _ = model(seqs[name][:fed].view(-1, 1))  # (T, 1, V)
        return torch.softmax(logits[-1, 0], -1)

    def join(names: str, prefix: int) -> None:
        if prefix:
            with torch.no_grad():
                out, hidden = model(seqs[names[0]][:prefix].view(-1, 1))
            rows.join(hidden, out[-1, 0], copies=len(names))
        else:
            rows.join(copies=len(names))
        for name in names:
            order.append(name)
            fed[name] = prefix

    order: list[str] = []  # the streams, in the order of their rows
    fed: dict[str, int] = {}
    joins = {0: [("A", 0), ("B", 5)], 2: [("C", 0)], 4: [("DE", 3)]}
    leaves = {4: "A", 6: "BD"}
    for step in range(9):
        if step in leaves:
            keep = [b for b, name in enumerate(order) if name not in leaves[step]]
            rows.keep(keep)
            order = [order[b] for b in keep]
        for names, prefix in joins.get(step, []):
            join(names, prefix)
        assert len(rows) == len(order)
        for b, name in enumerate(order):  # a read state's scores are there at once
            if fed[name]:
                got = torch.softmax(torch.from_numpy(rows.scores[b]), -1)
                torch.testing.assert_close(got, expected(name, fed[name]), atol=1e-5, rtol=0)
        rows.step(np.array([int(seqs[name][fed[name]]) for name in order]))
        for name in order:
            fed[name] += 1
        for b, name in enumerate(order):
            got = torch.softmax(torch.from_numpy(rows.scores[b]), -1)
            torch.testing.assert_close(got, expected(name, fed[name]), atol=1e-4, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=2, max_size=6), st.integers(0, 2**31 - 1))
def test_a_shared_picker_picks_the_same_when_rows_have_left(
    tokenizer: Tokenizer, present: list[bool], seed: int
) -> None:
    """The samples of charlm sample share one picker (one random generator): a sample that has
    ended leaves the batch, and the others pick what they would with it still there."""
    if not any(present):
        present[0] = True
    n, V = len(present), tokenizer.vocab_size
    config = SampleConfig(temperature=1.0, top_k=20, presence_penalty=0.5, repetition_penalty=1.3)
    full = Picker(config, make_generator(seed), tokenizer, n, [3, 4])
    alone = Picker(config, make_generator(seed), tokenizer, n, [3, 4])
    decoders = [RowDecoder(tokenizer, config, alone, i) for i in range(n)]
    rng = np.random.default_rng(seed)
    kept = [i for i in range(n) if present[i]]
    for _ in range(3):
        logits = (3 * rng.standard_normal((n, V))).astype(np.float32)
        picked = pick_tokens([decoders[i] for i in kept], logits[kept])
        assert picked.tolist() == full(logits)[kept].tolist()


def _through_engine(model: RNNLM, tokenizer: Tokenizer, asks: list[tuple[str, SampleConfig]], stepper: bool,
                    threads: int | None = None) -> list[tuple[str, str | None, int]]:  # fmt: skip
    """(text, finish, tokens) of each ask, all sent to one engine at once (they share its steps)."""
    engine = Engine(model, tokenizer, threads=threads)
    if not stepper:
        engine.stepper = None  # the module's path, as on CUDA
    texts: dict[int, str] = collections.defaultdict(str)
    finishes: dict[int, str | None] = {}
    done = threading.Event()

    def emit(i: int) -> Callable[[str, str | None], None]:
        def call(piece: str, finish: str | None) -> None:
            texts[i] += piece
            if finish is not None:
                finishes[i] = finish
                if len(finishes) == len(asks):
                    done.set()

        return call

    requests = [Request(prompt, config, emit(i)) for i, (prompt, config) in enumerate(asks)]
    engine.start()
    try:
        engine.submit(requests)
        assert done.wait(60)
    finally:
        engine.stop()
    return [(texts[i], finishes[i], r.completion_tokens) for i, r in enumerate(requests)]


@pytest.mark.parametrize("cell", ["mingru", "lstm"])
def test_one_seed_one_completion_through_sample_generate_and_the_engine(
    cell: str, tokenizer: Tokenizer, corpus_text: str
) -> None:
    """charlm sample (generate), bulk output and the API (sample_all) and the server (the engine,
    its rows sharing steps, on the stepper and on the module's path) give one text for one seed:
    a short prompt read through the steps and a long one read at once, with and without stop
    strings, penalties and banned text; and so does an engine that steps even a few rows on two
    threads of arithmetic, as the server's does."""
    model = tiny(cell, tokenizer.vocab_size, 0.3)
    counts = torch.bincount(torch.tensor(tokenizer.encode(corpus_text)), minlength=tokenizer.vocab_size)
    with torch.no_grad():  # the corpus's letters, as a trained model's first guess: stop strings come up
        model.decoder.bias.copy_(torch.log(counts.float() + 1e-3))
    long = "The quick brown fox jumps over the lazy dog. " * 3
    assert len(tokenizer.encode(long)) > PREFILL_TOKENS
    asks = [
        ("The ", SampleConfig(length=60, temperature=1.0, seed=3)),
        (long, SampleConfig(length=40, temperature=0.8, top_k=20, seed=4)),
        ("", SampleConfig(length=50, temperature=1.2, seed=5, stop=("e", "th"))),
        ("a", SampleConfig(length=50, temperature=1.0, seed=6, ban=("e",), repetition_penalty=1.3,
                           presence_penalty=0.2, min_p=0.05, stop=("\n",), include_stop=True)),
        ("def f", SampleConfig(length=0, seed=7)),
    ]  # fmt: skip
    expected = []
    for prompt, config in asks:
        config = dataclasses.replace(config, prime=prompt)
        run = generate(model, tokenizer, config, make_generator(config.seed))
        text = "".join(piece for _, piece in run)
        (sample,) = sample_all(model, tokenizer, config, make_generator(config.seed))
        assert (sample.text, sample.tokens, sample.stopped) == (text, run.tokens[0], run.stopped[0])
        finish = "stop" if run.stopped[0] else "length"
        expected.append((text, finish, run.tokens[0]))
    assert any(e[1] == "stop" for e in expected) and any(e[1] == "length" for e in expected)
    assert all(e[0] for e in expected[:4])
    for stepper, threads in ((True, None), (True, 2), (False, None)):
        assert _through_engine(model, tokenizer, asks, stepper, threads) == expected, (stepper, threads)
