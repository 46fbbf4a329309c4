"""Perplexity and bits-per-character arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from charlm.config import ModelConfig
from charlm.model.network import RNNLM
from charlm.model.scoring import evaluate, score


@pytest.mark.parametrize("vocab", [2, 65, 320])
def test_uniform_model_over_v_symbols_has_perplexity_v(vocab: int) -> None:
    model = RNNLM(ModelConfig(vocab_size=vocab, hidden=8, embed=8, layers=1, dropout=0.0))
    with torch.no_grad():  # every logit equal: p = 1/V for every token
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    ids = torch.randint(0, vocab, (1000,), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, ids, characters=1000, start_id=0)
    assert result.tokens == 1000
    assert result.loss == pytest.approx(math.log(vocab))
    assert result.perplexity == pytest.approx(vocab)
    assert result.bpc == pytest.approx(math.log2(vocab))  # one character per token


def test_bits_per_character_divides_by_characters_not_tokens() -> None:
    # 100 tokens covering 400 characters, 2 nats per token
    result = score(total_nats=200.0, tokens=100, characters=400)
    assert result.loss == pytest.approx(2.0)
    assert result.perplexity == pytest.approx(math.exp(2.0))
    assert result.bpc == pytest.approx(200.0 / math.log(2) / 400)


def test_evaluation_does_not_depend_on_window_size() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=7, hidden=8, embed=8, dropout=0.5))
    ids = torch.randint(0, 7, (503,))
    a = evaluate(model, ids, 503, 0, window=7)
    b = evaluate(model, ids, 503, 0, window=256)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert model.training  # restored after evaluation
