"""The recurrent language model: embedding -> stacked LSTM/GRU/RNN -> dropout -> (tied) decoder."""

from __future__ import annotations

import torch
from torch import nn

from charlm.config import Cell, ModelConfig

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""(layers, B, H) for GRU and RNN; the pair (h, c) of such tensors for LSTM."""

_CELLS: dict[Cell, type[nn.RNNBase]] = {Cell.lstm: nn.LSTM, Cell.gru: nn.GRU, Cell.rnn: nn.RNN}


class RNNLM(nn.Module):
    """A stacked recurrent language model over token ids, time-major like ``nn.LSTM``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.drop = nn.Dropout(config.dropout)
        # nn.LSTM applies dropout between layers only, so one layer takes none there.
        self.rnn = _CELLS[config.cell](
            config.embed,
            config.hidden,
            config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.decoder = nn.Linear(config.hidden, config.vocab_size)
        if config.tie_weights:  # Press & Wolf 2017; ModelConfig checked embed == hidden
            self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not self.config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if self.config.cell is Cell.lstm:
            self._init_forget_bias(1.0)

    def _init_forget_bias(self, value: float) -> None:
        """Start the LSTM remembering (Gers et al. 2000; Jozefowicz et al. 2015).

        PyTorch's gate order is input, forget, cell, output, and the two biases are summed, so the
        forget slice of ``bias_ih`` is set to ``value`` and that of ``bias_hh`` to zero.
        """
        h = self.config.hidden
        with torch.no_grad():
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    param[h : 2 * h].fill_(value)
                elif name.startswith("bias_hh"):
                    param[h : 2 * h].zero_()

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero hidden state for ``batch_size`` streams, on the model's device and dtype."""
        weight = self.decoder.weight
        shape = (self.config.layers, batch_size, self.config.hidden)
        if self.config.cell is Cell.lstm:
            return (weight.new_zeros(shape), weight.new_zeros(shape))
        return weight.new_zeros(shape)

    def forward(self, tokens: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """Logits for the next token at every position.

        Args:
            tokens: (T, B) token ids.
            hidden: state from the previous window, or None for zeros.

        Returns:
            logits (T, B, V) and the final hidden state.
        """
        emb = self.drop(self.embedding(tokens))  # (T, B, E)
        output, hidden = self.rnn(emb, hidden)  # (T, B, H)
        return self.decoder(self.drop(output)), hidden  # (T, B, V)


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph at a window boundary (truncated BPTT) but keep the values, in fp32 (a bf16
    autocast step returns a bf16 state; the carried state and the checkpoints stay fp32)."""
    if isinstance(hidden, tuple):
        return (hidden[0].detach().float(), hidden[1].detach().float())
    return hidden.detach().float()


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
