"""The model: initialisation, weight tying, and hidden state carried across BPTT windows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import Cell, ModelConfig
from charlm.errors import ConfigError
from charlm.model.network import RNNLM, detach_hidden


def tiny(cell: Cell = Cell.lstm, **kw: object) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=11, cell=cell, layers=2, hidden=8, embed=8, dropout=0.0, **kw)).eval()


@pytest.mark.parametrize("bias", [1.0, 2.5, 0.0])
def test_lstm_forget_gate_bias_starts_where_asked(bias: float) -> None:
    model = tiny(Cell.lstm, forget_bias=bias)
    for layer in range(2):
        total = getattr(model.rnn, f"bias_ih_l{layer}") + getattr(model.rnn, f"bias_hh_l{layer}")
        assert torch.all(total[8:16] == bias)  # gate order i, f, g, o


def test_irnn_is_relu_with_an_identity_recurrence() -> None:
    model = tiny(Cell.irnn)
    assert model.rnn.nonlinearity == "relu"
    for layer in range(2):
        assert torch.equal(getattr(model.rnn, f"weight_hh_l{layer}"), torch.eye(8))
        assert not getattr(model.rnn, f"bias_hh_l{layer}").any()


def test_tied_weights_share_one_tensor_and_need_equal_sizes() -> None:
    model = tiny(tie_weights=True)
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ConfigError, match="tie_weights"):
        ModelConfig(vocab_size=11, cell=Cell.lstm, hidden=8, embed=4, tie_weights=True)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cell", list(Cell))
@given(split=st.integers(1, 19))
@settings(max_examples=20, deadline=None)
def test_carried_hidden_state_continues_the_sequence(cell: Cell, residual: bool, split: int) -> None:
    """Two windows with the state carried (and detached) give the logits of one long window."""
    if cell.scan and residual:
        pytest.skip("a scan cell's layers are residual blocks already (--residual is refused)")
    model = tiny(cell, residual=residual)
    tokens = torch.randint(0, 11, (20, 3), generator=torch.Generator().manual_seed(1))  # (T, B)
    whole, _ = model(tokens)
    first, hidden = model(tokens[:split])
    second, _ = model(tokens[split:], detach_hidden(hidden))
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-6)


def test_detach_cuts_the_graph_between_windows() -> None:
    model = tiny(Cell.lstm).train()
    _, hidden = model(torch.zeros(4, 2, dtype=torch.long))
    h, c = detach_hidden(hidden)
    assert not h.requires_grad and not c.requires_grad


def test_init_hidden_shapes() -> None:
    h, c = tiny(Cell.lstm).init_hidden(5)
    assert h.shape == c.shape == (2, 5, 8)
    assert tiny(Cell.gru).init_hidden(5).shape == (2, 5, 8)


def test_the_adaptive_softmax_is_a_distribution_and_its_loss_is_its_cross_entropy() -> None:
    from torch.nn import functional as F

    from charlm.config import Softmax

    torch.manual_seed(0)
    model = RNNLM(
        ModelConfig(vocab_size=300, cell=Cell.lstm, hidden=16, embed=8, dropout=0.0, softmax=Softmax.adaptive)
    ).eval()
    counts = torch.randint(0, 1000, (300,))
    model.sort_by_frequency(counts)
    assert model.rank[counts.argmax()] == 0 and sorted(model.rank.tolist()) == list(range(300))
    tokens = torch.randint(0, 300, (7, 3))  # (T, B)
    targets = torch.randint(0, 300, (7, 3))
    targets[-1, 1] = -100  # evaluation padding
    with torch.no_grad():
        output, _ = model.features(tokens)  # (T, B, H)
        scores = model.logits(output)  # (T, B, V): log-probabilities in token order
        torch.testing.assert_close(scores.exp().sum(-1), torch.ones(7, 3))
        expected = F.cross_entropy(
            scores.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        torch.testing.assert_close(model.loss(output, targets, reduction="sum"), expected)


def test_adaptive_softmax_and_tied_weights_do_not_mix() -> None:
    from charlm.config import Softmax

    with pytest.raises(ConfigError, match="tie_weights needs the full softmax"):
        ModelConfig(vocab_size=300, hidden=8, embed=8, tie_weights=True, softmax=Softmax.adaptive)


def test_residual_layers_add_their_input_to_their_output() -> None:
    model = tiny(Cell.gru, residual=True)
    tokens = torch.randint(0, 11, (5, 2))
    with torch.no_grad():
        first, _ = model.rnn[0](model.embedding(tokens))  # (T, B, H)
        second, _ = model.rnn[1](first)
        output, _ = model.features(tokens)
    torch.testing.assert_close(output, second + first)
