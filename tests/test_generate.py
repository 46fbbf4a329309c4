"""Sampling filters and seeds."""

from __future__ import annotations

import platform
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from charlm.config import SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.generation.sampling import Picker, filter_logits, make_generator, pick_rows

logit_lists = st.lists(st.floats(-10, 10), min_size=2, max_size=30)


@given(logit_lists, st.integers(1, 30))
def test_top_k_keeps_k_most_likely(values: list[float], k: int) -> None:
    logits = torch.tensor(values)
    kept = torch.isfinite(filter_logits(logits, k, 1.0))
    assert kept.sum() >= min(k, len(values))  # ties may keep more
    assert logits[kept].min() >= torch.topk(logits, min(k, len(values))).values[-1]


@given(logit_lists, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(values: list[float], p: float) -> None:
    logits = torch.tensor(values)
    kept = torch.isfinite(filter_logits(logits, 0, p))
    probs = torch.softmax(logits, -1)
    mass = probs[kept].sum()
    assert mass >= p - 1e-5  # reaches p
    assert mass - probs[kept].min() < p + 1e-5  # and is the smallest such set
    if (~kept).any():  # every kept token is at least as likely as every dropped one
        assert probs[kept].min() >= probs[~kept].max() - 1e-7


def test_temperature_zero_is_greedy() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 1.0]])
    assert Picker(SampleConfig(temperature=0), make_generator(0))(logits).tolist() == [1, 0]


def test_same_seed_same_choices() -> None:
    logits = torch.zeros(4, 50)
    config = SampleConfig(temperature=1.0)
    a = [p(logits).tolist() for p in [Picker(config, make_generator(7))] for _ in range(300)]
    b = [p(logits).tolist() for p in [Picker(config, make_generator(7))] for _ in range(300)]
    assert a == b


def test_sampling_follows_the_distribution_and_never_picks_a_masked_token() -> None:
    """Drawn frequencies match softmax(logits / T) (a chi-square bound), and top-k's masked
    tokens (probability 0) are never drawn, whatever the uniform number."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5])
    config = SampleConfig(temperature=0.8)
    draws = torch.from_numpy(Picker(config, make_generator(3))(logits.expand(200_000, -1)))
    counts = torch.bincount(draws, minlength=6).double()
    expected = torch.softmax(logits.double() / 0.8, -1) * draws.numel()
    seen = expected > 5
    chi2 = (((counts - expected) ** 2)[seen] / expected[seen]).sum()
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001
    top2 = Picker(SampleConfig(temperature=1.0, top_k=2), make_generator(4))(logits.expand(50_000, -1))
    assert set(top2.tolist()) == {0, 1}


def test_the_unknown_piece_is_never_sampled(corpus_text: str) -> None:
    from charlm.config import ModelConfig, TokenizerConfig
    from charlm.data.tokenizer import train_tokenizer
    from charlm.generation.sampling import generate
    from charlm.model.network import RNNLM

    tokenizer = train_tokenizer(corpus_text, TokenizerConfig())
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden=8, embed=8))
    with torch.no_grad():
        model.decoder.bias[tokenizer.unk_id] = 50.0  # the model would say nothing else
    pieces = generate(model, tokenizer, SampleConfig(length=50, temperature=1.0), make_generator(0))
    text = "".join(piece for _, piece in pieces)
    assert "\u2047" not in text and len(text) >= 10


def test_several_samples_are_drawn_at_once_each_from_the_prime(corpus_text: str) -> None:
    """--num-samples runs one batch: every sample continues the prime, they differ, and the
    first of a batch of 3 is what a greedy single sample would be when the temperature is 0."""
    from charlm.config import ModelConfig, TokenizerConfig
    from charlm.data.tokenizer import train_tokenizer
    from charlm.generation.sampling import generate
    from charlm.model.network import RNNLM

    tokenizer = train_tokenizer(corpus_text, TokenizerConfig())
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden=16))

    def texts(config: SampleConfig) -> list[str]:
        out = [""] * config.num_samples
        for i, piece in generate(model, tokenizer, config, make_generator(1)):
            out[i] += piece
        return out

    many = texts(SampleConfig(length=40, temperature=1.0, prime="ab", num_samples=5))
    assert len(set(many)) == 5 and all(t for t in many)
    greedy = texts(SampleConfig(length=40, temperature=0, prime="ab", num_samples=3))
    assert greedy == texts(SampleConfig(length=40, temperature=0, prime="ab", num_samples=1)) * 3


@pytest.mark.parametrize(
    "cell,layers,softmax,residual",
    [("lstm", 1, "full", False), ("lstm", 3, "full", False), ("gru", 1, "full", False),
     ("gru", 3, "full", False), ("rnn", 1, "full", False), ("rnn", 3, "full", False),
     ("irnn", 2, "full", False), ("lstm", 2, "adaptive", False), ("lstm", 3, "full", True),
     ("gru", 3, "full", True), ("mingru", 2, "full", False), ("minlstm", 3, "adaptive", False)],
)  # fmt: skip
def test_stepper_gives_the_probabilities_of_the_model(
    cell: str, layers: int, softmax: str, residual: bool
) -> None:
    """Step by step, the fast path's next-token distribution equals nn.LSTM/GRU/RNN's to 1e-5."""
    from charlm.config import Cell, ModelConfig, Softmax
    from charlm.model.network import RNNLM
    from charlm.model.stepper import Stepper

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=70, cell=Cell(cell), layers=layers, hidden=48, embed=48 if Cell(cell).scan else 24,
        softmax=Softmax(softmax),
        residual=residual,
    )  # fmt: skip
    model = RNNLM(config).eval()
    model.sort_by_frequency(torch.randint(0, 100, (70,)))
    with torch.no_grad():
        for p in model.parameters():
            # larger than the initialisation: saturating gates are tested too (ReLU does not
            # saturate: its states would grow without bound over 40 steps, so smaller)
            p.normal_(0, 0.1 if cell == "irnn" else 0.3)
    stepper = Stepper(model)
    tokens = torch.randint(0, 70, (40, 5))  # (T, B): five streams at once
    hidden = model.init_hidden(5)
    with torch.no_grad():
        for t in range(tokens.size(0)):  # each step from the same state the module reached
            logits, _ = stepper.step(tokens[t].numpy(), stepper.state_from(hidden))  # (B, V)
            expected, hidden = model(tokens[t : t + 1], hidden)  # (1, B, V), nn.LSTM's own step
            torch.testing.assert_close(
                torch.softmax(torch.from_numpy(logits), -1), torch.softmax(expected[0], -1), atol=1e-5, rtol=0
            )
        # and stepping on its own state tracks the module over the whole sequence (looser: a
        # saturated tanh RNN amplifies float rounding differences over 40 steps)
        state, run = stepper.state_from(model.init_hidden(5)), None
        for t in range(tokens.size(0)):
            run, state = stepper.step(tokens[t].numpy(), state)
        torch.testing.assert_close(
            torch.softmax(torch.from_numpy(run), -1), torch.softmax(expected[0], -1), atol=5e-4, rtol=0
        )


def test_a_product_is_the_same_whatever_rows_share_it() -> None:
    """The stepper's products: oneDNN's prepacked one (two rows or more) and NumPy's (one row, or
    small weights without AVX-512) agree to float rounding, and through oneDNN a row's result does
    not depend on the rows beside it, bit for bit."""
    from charlm.model.stepper import Linear, prepacks

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 40), dtype=np.float32)  # (out, in)
    bias = rng.standard_normal(96, dtype=np.float32)
    plain = Linear(weight, bias, packed=False)
    assert not plain.packed
    x = rng.standard_normal((70, 40), dtype=np.float32)
    np.testing.assert_allclose(plain(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert prepacks(np.zeros((2048, 512), np.float32))  # a 2x512 LSTM's products: oneDNN's anywhere
    linear = Linear(weight, bias, packed=True)
    full = linear(x)  # (70, 96)
    np.testing.assert_allclose(full, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x[:1]), full[:1], rtol=1e-5, atol=1e-5)
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert linear.packed  # a PyTorch whose private oneDNN ops changed must not pass silently
    if linear.packed:
        for rows in (2, 3, 17, 33):
            assert np.array_equal(linear(x[:rows]), full[:rows])
            assert np.array_equal(linear(x[-rows:]), full[-rows:])


controls = st.tuples(
    st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    st.sampled_from([0, 1, 4]),
    st.sampled_from([1.0, 0.8, 0.3]),
    st.sampled_from([0.0, 0.05, 0.5]),
    st.sampled_from([0.0, 0.0, 1.0]),
)  # temperature, top-k, top-p, min-p, presence penalty (a row that picks on its own)


@given(st.lists(controls, min_size=1, max_size=10), st.integers(0, 2**31 - 1))
def test_streams_drawn_together_pick_what_each_would_alone(rows: list[tuple], seed: int) -> None:
    """A server's streams draw their tokens in one vectorised call per set of controls (rows with
    penalties pick on their own, between them): the tokens, and the random numbers each stream has
    used, are what each stream's own picker gives alone."""
    vocab = cast(Tokenizer, SimpleNamespace(vocab_size=12))  # all the penalties need of it

    def pickers() -> list[Picker]:
        return [
            Picker(SampleConfig(temperature=t, top_k=k, top_p=p, min_p=m, presence_penalty=pen),
                   make_generator(seed + i), vocab, 1, [3, 5])
            for i, (t, k, p, m, pen) in enumerate(rows)
        ]  # fmt: skip

    together, alone = pickers(), pickers()
    rng = np.random.default_rng(seed)
    for _ in range(3):  # several steps: each stream's random numbers go on alike
        logits = (3 * rng.standard_normal((len(rows), 12))).astype(np.float32)  # (B, V)
        picked = pick_rows(together, logits, [])
        assert picked.tolist() == [int(p(logits[i : i + 1])[0]) for i, p in enumerate(alone)]
