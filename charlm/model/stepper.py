"""One token at a time, fast, on the CPU: the recurrence of a trained :class:`RNNLM` as plain
NumPy matrix products.

Calling ``nn.LSTM`` once per generated token pays its whole set-up (weight checks, workspace,
the fused-kernel launch, autograd bookkeeping) for a single time step: on a 2-core CPU about
300 steps/s for a 2x512 LSTM, while the arithmetic takes a tenth of a millisecond. One stream is
bound by reading the weights once per token, so :class:`Stepper` keeps them in the layout one
step needs and does only that arithmetic:

- the first layer's input projection is a lookup: ``embedding @ W_ih0.T + b_ih0`` is precomputed
  as a (V, gates) table, so a token costs one row read instead of a matrix product;
- above the first layer, the input and recurrent products of an LSTM or RNN are one product of
  [x, h] with [W_ih | W_hh];
- the products go through NumPy's BLAS (OpenBLAS): its matrix-vector product reads the weights at
  ~110 GB/s on this project's 2-core AMD machine where PyTorch's (MKL) reads ~36 GB/s (a 2048x1024
  product: 76 against 220 microseconds), and NumPy's per-call cost on small arrays is a third of
  PyTorch's;
- the gate math follows PyTorch's own definitions of LSTM, GRU and tanh RNN, so the
  probabilities equal ``nn.LSTM``'s to float rounding (a test holds them to 1e-5).

It steps B streams at once, so many samples cost little more than one. It is CPU-only: on CUDA a
step is bound by kernel launches, and :func:`charlm.generation.sampling.generate` calls the module (cuDNN).
"""

from __future__ import annotations

import numpy as np
import torch

from charlm.config import Cell
from charlm.model.network import RNNLM, Hidden

Array = np.ndarray


def _sigmoid(x: Array) -> Array:
    """sigmoid(x) = (1 + tanh(x / 2)) / 2, in place: NumPy has tanh but no sigmoid."""
    x *= 0.5
    np.tanh(x, out=x)
    x += 1.0
    x *= 0.5
    return x


class Stepper:
    """The recurrence of ``model`` for one time step of B streams (inference, CPU, float32).

    State is a list, one entry per layer: (h, c) pairs of (B, H) arrays for LSTM, h (B, H) otherwise.
    """

    @torch.no_grad()
    def __init__(self, model: RNNLM) -> None:
        config = model.config
        self.residual = config.residual
        self.cell, self.layers, self.hidden = config.cell, config.layers, config.hidden

        def weights(name: str) -> list[Array]:
            return [model.recurrent(name, i).detach().float().cpu().numpy() for i in range(self.layers)]

        w_ih, w_hh = weights("weight_ih"), weights("weight_hh")  # (G, in), (G, H)
        b_ih, b_hh = weights("bias_ih"), weights("bias_hh")  # (G,)
        embedding = model.embedding.weight.detach().float().cpu().numpy()  # (V, E)
        # (V, G): the first layer's input gates for every token, bias included
        self.table = embedding @ w_ih[0].T + b_ih[0]
        # A layer above the first takes [x, h] against [W_ih | W_hh] in one product (LSTM, RNN);
        # GRU keeps them apart, since its reset gate multiplies the recurrent half alone.
        self.fused = self.cell is not Cell.gru
        self.w_x = [
            np.concatenate([w_ih[i], w_hh[i]], 1).T if self.fused else w_ih[i].T for i in range(self.layers)
        ]
        self.b_x = [b_ih[i] + b_hh[i] if self.fused else b_ih[i] for i in range(self.layers)]
        self.w_hh = [w.T for w in w_hh]  # (H, G) views of (G, H): x @ W.T reads W row by row
        self.b_hh = b_hh
        self.model = model
        self.full = model.decoder is not None  # else the adaptive softmax: through the module
        if model.decoder is not None:
            self.w_out = model.decoder.weight.detach().float().cpu().numpy().T  # (H, V)
            self.b_out = model.decoder.bias.detach().float().cpu().numpy()  # (V,)

    def state_from(self, hidden: Hidden) -> list:
        """Convert ``nn.LSTM``-style hidden state ((layers, B, H), or a pair) to a Stepper state."""

        def arr(t: torch.Tensor) -> Array:
            return t.detach().float().cpu().numpy().copy()

        if self.cell is Cell.lstm:
            h, c = hidden  # type: ignore[misc]
            return [(arr(h[i]), arr(c[i])) for i in range(self.layers)]
        return [arr(hidden[i]) for i in range(self.layers)]  # type: ignore[index]

    def step(self, tokens: Array, state: list) -> tuple[Array, list]:
        """Logits (B, V) for the token after ``tokens`` (B,) of ids, and the new state."""
        H = self.hidden
        x = self.table  # replaced by each layer's output
        new_state = []
        for i in range(self.layers):
            h_prev = state[i][0] if self.cell is Cell.lstm else state[i]  # (B, H)
            if i == 0:
                gi = self.table[tokens]  # (B, G), a copy
                if self.fused:
                    gi += h_prev @ self.w_hh[0]
                    gi += self.b_hh[0]
            elif self.fused:
                gi = np.concatenate([x, h_prev], 1) @ self.w_x[i]  # (B, G): all gates
                gi += self.b_x[i]
            else:
                gi = x @ self.w_x[i]  # (B, 3H): the input half of the gates
                gi += self.b_x[i]
            if self.cell is Cell.lstm:  # PyTorch's gate order: input, forget, cell, output
                cand = np.tanh(gi[:, 2 * H : 3 * H])
                _sigmoid(gi)  # all four; the cell slice is not used
                c = gi[:, H : 2 * H] * state[i][1] + gi[:, :H] * cand
                h = gi[:, 3 * H :] * np.tanh(c)
                new_state.append((h, c))
            elif self.cell is Cell.gru:  # order: reset, update, new
                gh = h_prev @ self.w_hh[i] + self.b_hh[i]  # (B, 3H)
                gates = _sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])  # reset, update
                cand = np.tanh(gi[:, 2 * H :] + gates[:, :H] * gh[:, 2 * H :])
                update = gates[:, H:]
                h = (1.0 - update) * cand + update * h_prev
                new_state.append(h)
            elif self.cell is Cell.irnn:
                h = np.maximum(gi, 0.0)  # (B, H): ReLU
                new_state.append(h)
            else:
                h = np.tanh(gi)  # (B, H)
                new_state.append(h)
            x = h + x if self.residual and i > 0 else h  # the residual connection adds the input
        if not self.full:
            with torch.no_grad():
                return self.model.logits(torch.from_numpy(x)).numpy(), new_state  # (B, V)
        logits = x @ self.w_out  # (B, V)
        logits += self.b_out
        return logits, new_state
