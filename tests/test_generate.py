"""Sampling filters and seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from charlm.config import SampleConfig
from charlm.generate import filter_logits, make_generator, pick

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
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert pick(logits, SampleConfig(temperature=0), make_generator(0)) == 1


def test_same_seed_same_choices() -> None:
    logits = torch.zeros(50)
    config = SampleConfig(temperature=1.0)
    a = [pick(logits, config, g) for g in [make_generator(7)] for _ in range(20)]
    b = [pick(logits, config, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b


def test_the_unknown_piece_is_never_sampled(corpus_text: str) -> None:
    from charlm.config import ModelConfig, TokenizerConfig
    from charlm.generate import generate
    from charlm.model import RNNLM
    from charlm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus_text, TokenizerConfig())
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden=8, embed=8))
    with torch.no_grad():
        model.decoder.bias[tokenizer.unk_id] = 50.0  # the model would say nothing else
    text = "".join(generate(model, tokenizer, SampleConfig(length=50, temperature=1.0), make_generator(0)))
    assert "\u2047" not in text and len(text) >= 10


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 3])
def test_stepper_gives_the_probabilities_of_the_model(cell: str, layers: int) -> None:
    """Step by step, the fast path's next-token distribution equals nn.LSTM/GRU/RNN's to 1e-5."""
    from charlm.config import Cell, ModelConfig
    from charlm.model import RNNLM
    from charlm.stepper import Stepper

    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=70, cell=Cell(cell), layers=layers, hidden=48, embed=24)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # larger than the initialisation: saturating gates are tested too
    stepper = Stepper(model)
    tokens = torch.randint(0, 70, (40, 5))  # (T, B): five streams at once
    hidden = model.init_hidden(5)
    with torch.no_grad():
        for t in range(tokens.size(0)):  # each step from the same state the module reached
            logits, _ = stepper.step(tokens[t], stepper.state_from(hidden))  # (B, V)
            expected, hidden = model(tokens[t : t + 1], hidden)  # (1, B, V), nn.LSTM's own step
            torch.testing.assert_close(
                torch.softmax(logits, -1), torch.softmax(expected[0], -1), atol=1e-5, rtol=0
            )
        # and stepping on its own state tracks the module over the whole sequence
        state, run = stepper.state_from(model.init_hidden(5)), None
        for t in range(tokens.size(0)):
            run, state = stepper.step(tokens[t], state)
        torch.testing.assert_close(torch.softmax(run, -1), torch.softmax(expected[0], -1), atol=1e-4, rtol=0)
