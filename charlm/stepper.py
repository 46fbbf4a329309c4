"""One token at a time, fast: the recurrence of a trained :class:`RNNLM` as plain matrix products.

Calling ``nn.LSTM`` once per generated token pays its whole set-up (weight checks, workspace,
the fused-kernel launch) for a single time step; on a 2-core CPU that is ~110 steps/s for a 2x512
LSTM, while the arithmetic takes well under a millisecond. :class:`Stepper` keeps the weights in
the layout one step needs and does only that arithmetic:

- the first layer's input projection is a lookup: ``embedding @ W_ih0.T + b_ih0`` is precomputed
  as a (V, gates) table, so a token costs one row read instead of a matrix product;
- above the first layer, the input and recurrent products of an LSTM or RNN are one product of
  [x, h] with [W_ih | W_hh]; weights keep the (gates, inputs) layout that matrix-vector products
  read fastest. One stream is bound by reading the weights once per token (~40 GB/s here);
- the gate math follows PyTorch's own definitions of LSTM, GRU and tanh RNN, so the
  probabilities equal ``nn.LSTM``'s to float rounding (a test holds them to 1e-5).

It steps B streams at once, so many samples cost little more than one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from charlm.config import Cell
from charlm.model import RNNLM, Hidden


class Stepper:
    """The recurrence of ``model`` for one time step of B streams (inference only).

    State is a list, one entry per layer: (h, c) pairs of (B, H) for LSTM, h (B, H) otherwise.
    """

    @torch.no_grad()
    def __init__(self, model: RNNLM) -> None:
        rnn, config = model.rnn, model.config
        self.cell, self.layers, self.hidden = config.cell, config.layers, config.hidden
        w_ih = [getattr(rnn, f"weight_ih_l{i}").detach() for i in range(self.layers)]  # (G, in)
        w_hh = [getattr(rnn, f"weight_hh_l{i}").detach() for i in range(self.layers)]  # (G, H)
        b_ih = [getattr(rnn, f"bias_ih_l{i}").detach() for i in range(self.layers)]  # (G,)
        b_hh = [getattr(rnn, f"bias_hh_l{i}").detach() for i in range(self.layers)]  # (G,)
        # (V, G): the first layer's input gates for every token, bias included
        self.table = torch.addmm(b_ih[0], model.embedding.weight.detach(), w_ih[0].t())
        # Weights stay (G, in), the layout a matrix-vector product reads fastest. For LSTM and RNN,
        # a layer above the first takes [x, h] against [W_ih | W_hh] in one product.
        self.fused = self.cell is not Cell.gru
        self.w_x = [torch.cat([w_ih[i], w_hh[i]], 1) if self.fused else w_ih[i] for i in range(self.layers)]
        self.b_x = [b_ih[i] + b_hh[i] if self.fused else b_ih[i] for i in range(self.layers)]
        self.w_hh, self.b_hh = w_hh, b_hh
        self.w_out = model.decoder.weight.detach()  # (V, H)
        self.b_out = model.decoder.bias.detach()  # (V,)

    def state_from(self, hidden: Hidden) -> list:
        """Convert ``nn.LSTM``-style hidden state ((layers, B, H), or a pair) to a Stepper state."""
        if self.cell is Cell.lstm:
            h, c = hidden  # type: ignore[misc]
            return [(h[i], c[i]) for i in range(self.layers)]
        return [hidden[i] for i in range(self.layers)]  # type: ignore[index]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Logits (B, V) for the token after ``tokens`` (B,), and the new state."""
        x = torch.empty(0)
        new_state = []
        for i in range(self.layers):
            h_prev = state[i][0] if self.cell is Cell.lstm else state[i]  # (B, H)
            if i == 0:
                gi = self.table[tokens]  # (B, G)
                if self.fused:
                    gi = F.linear(h_prev, self.w_hh[0], self.b_hh[0]).add_(gi)  # all gates
            elif self.fused:
                gi = F.linear(torch.cat([x, h_prev], 1), self.w_x[i], self.b_x[i])  # all gates
            else:
                gi = F.linear(x, self.w_x[i], self.b_x[i])  # input half of the gates
            if self.cell is Cell.lstm:
                in_gate, forget, cand, out = gi.chunk(4, 1)  # PyTorch's order: i, f, g, o
                c = torch.sigmoid(forget) * state[i][1] + torch.sigmoid(in_gate) * torch.tanh(cand)
                h = torch.sigmoid(out) * torch.tanh(c)
                new_state.append((h, c))
            elif self.cell is Cell.gru:
                gh = F.linear(h_prev, self.w_hh[i], self.b_hh[i])  # (B, 3H): r, z, n
                i_r, i_z, i_n = gi.chunk(3, 1)
                h_r, h_z, h_n = gh.chunk(3, 1)
                reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                cand = torch.tanh(i_n + reset * h_n)
                h = (1 - update) * cand + update * h_prev
                new_state.append(h)
            else:
                h = torch.tanh(gi)  # (B, H)
                new_state.append(h)
            x = h
        return F.linear(x, self.w_out, self.b_out), new_state  # (B, V)
