"""Perplexity and bits-per-character arithmetic, and a text scored in pieces as if read in order."""

from __future__ import annotations

import math

import pytest
import torch

from charlm.config import Cell, ModelConfig
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


@pytest.mark.parametrize("cell", [Cell.mingru, Cell.lstm])
def test_pieces_that_read_the_text_before_them_score_as_one_stream(cell: Cell) -> None:
    """A model that forgets all but its last few tokens scores a text in 32 pieces of 125 tokens,
    each after the first reading the 64 tokens before it, as one stream reading it in order would;
    without that context the first tokens of 31 pieces are predicted from nothing, and the figure
    differs."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=11, cell=cell, hidden=8, embed=8, layers=1, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():  # large weights: the scores depend much on the last tokens
            p.mul_(4)
        if cell is Cell.mingru:  # every step keeps exp(-5) of its past: gone after a few tokens
            model.rnn.blocks[0].mix.bias[:8] = 30.0
        else:  # forget gates shut: the cell forgets at once, and what h carries fades through W_hh
            model.rnn.bias_ih_l0[8:16] = -30.0
            model.rnn.bias_hh_l0[8:16] = 0.0
    ids = torch.randint(0, 11, (4000,), generator=torch.Generator().manual_seed(1))
    one = evaluate(model, ids, 4000, 0, streams=1).loss
    assert evaluate(model, ids, 4000, 0, streams=32, context=64).loss == pytest.approx(one, rel=1e-6)
    assert evaluate(model, ids, 4000, 0, streams=32, context=0).loss != pytest.approx(one, rel=1e-6)
