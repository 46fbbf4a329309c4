"""The recurrent state of B streams, stepped together: one interface over the CPU's NumPy stepper
and the torch module, for every cell.

A recurrent model's state is a few kilobytes per stream and does not grow with the text, so many
streams cost one batched step each token, and a stream can join or leave the batch between any
two steps: its state is one row of each state array. :class:`Rows` keeps those arrays and the
rows' next-token scores, and hides which backend steps them: :class:`~charlm.model.stepper.Stepper`
on the CPU (a step is a few prepacked products and NumPy gate math), the module elsewhere (on
CUDA a step is bound by kernel launches, and cuDNN does them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from charlm.config import Cell
from charlm.model.network import RNNLM, Hidden
from charlm.model.stepper import Stepper

# One part of the state of the rows: a (B, S) array (the stepper's), or a (layers, B, S) tensor
# (the module's). A state is a list of them: h and c for the LSTM, h (or a scan cell's packed
# state) otherwise.
Part = np.ndarray | torch.Tensor


def fast_stepper(model: RNNLM) -> Stepper | None:
    """The NumPy stepper of ``model`` where it is the faster way to step (the CPU), else None."""
    return Stepper(model) if model.device.type == "cpu" else None


class Rows:
    """The recurrent states and next-token scores of B streams (rows), stepped together.

    Rows join (:meth:`join`, at the end, from a read text's state or from nothing) and leave
    (:meth:`keep`) between steps; :meth:`step` feeds every row one token. Joins are gathered and
    made at the next use, so that many rows joining at once cost one concatenation.

    Args:
        model: the model whose recurrence is stepped.
        stepper: its :class:`Stepper` (the CPU's fast path: see :func:`fast_stepper`), or None to
            step the module itself.
    """

    def __init__(self, model: RNNLM, stepper: Stepper | None) -> None:
        self.model, self.stepper = model, stepper
        self._lstm = model.config.cell is Cell.lstm
        self._parts: list[Part] = []  # the rows' state (see Part); empty while there are none
        self._scores = np.zeros((0, model.config.vocab_size), np.float32)  # (B, V)
        self._joining: list[tuple[list[Part], np.ndarray]] = []  # (state, scores) of rows to join

    def __len__(self) -> int:
        return self._scores.shape[0] + sum(scores.shape[0] for _, scores in self._joining)

    def join(self, hidden: Hidden | None = None, logits: torch.Tensor | np.ndarray | None = None,
             copies: int = 1) -> None:  # fmt: skip
        """Add ``copies`` rows at the end, each from ``hidden`` ((layers, 1, S), or a pair for the
        LSTM: a :class:`~charlm.generation.sampling.Context`'s) with next-token scores ``logits``
        (V,). Without ``hidden``, from the state of a model that has read nothing (zeros), with
        zero scores: such a row must read a token before its scores mean anything. ``hidden`` and
        ``logits`` are copied, never changed."""
        if hidden is None:
            parts = self._zero(copies)
        elif self.stepper is not None:
            parts = [np.repeat(a, copies, 0) for a in self._flat(self.stepper.state_from(hidden))]
        else:
            parts = [h.repeat(1, copies, 1) for h in (hidden if isinstance(hidden, tuple) else (hidden,))]
        if logits is None:
            scores = np.zeros((copies, self._scores.shape[1]), np.float32)
        else:
            row = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
            scores = np.repeat(row.astype(np.float32, copy=False).reshape(1, -1), copies, 0)  # (copies, V)
        self._joining.append((parts, scores))

    @property
    def scores(self) -> np.ndarray:
        """The rows' next-token scores (B, V), float32: the batch's own array, which the caller may
        change (the next step replaces it)."""
        self._settle()
        return self._scores

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in their new order); the others leave."""
        self._settle()
        if list(rows) == list(range(len(self._scores))):
            return
        index = list(rows)
        if self.stepper is not None:
            self._parts = [part[index] for part in self._parts]
        else:
            at = torch.tensor(index, dtype=torch.long, device=self.model.device)
            self._parts = [part.index_select(1, at) for part in self._parts]
        self._scores = self._scores[index]

    @torch.no_grad()
    def step(self, tokens: np.ndarray) -> None:
        """Feed row b the token ``tokens[b]`` (B,): its state and scores move on one token."""
        self._settle()
        if not len(self._scores):
            return
        if self.stepper is not None:
            self._scores, state = self.stepper.step(tokens, self._nested())  # (B, V)
            self._parts = self._flat(state)
            return
        model = self.model
        ids = torch.from_numpy(tokens).to(model.device).view(1, -1)  # (1, B)
        out, hidden = model(ids, self._nested())  # (1, B, V)
        self._parts = list(hidden) if isinstance(hidden, tuple) else [hidden]
        self._scores = out[0].float().cpu().numpy()

    def _zero(self, rows: int) -> list[Part]:
        if self.stepper is not None:
            return self._flat(self.stepper.zero_state(rows))
        hidden = self.model.init_hidden(rows)
        return list(hidden) if isinstance(hidden, tuple) else [hidden]

    def _settle(self) -> None:
        """Make the joins waiting: one concatenation for all of them."""
        if not self._joining:
            return
        pieces = ([self._parts] if len(self._scores) else []) + [parts for parts, _ in self._joining]
        if self.stepper is not None:
            self._parts = [np.concatenate([p[j] for p in pieces]) for j in range(len(pieces[0]))]
        else:
            self._parts = [torch.cat([p[j] for p in pieces], 1) for j in range(len(pieces[0]))]
        self._scores = np.concatenate([self._scores, *(scores for _, scores in self._joining)])
        self._joining = []

    def _flat(self, state: list) -> list[Part]:
        """A :class:`Stepper` state (a list per layer: an array, or an (h, c) pair) as its parts."""
        return [a for layer in state for a in layer] if self._lstm else list(state)

    def _nested(self) -> list | Hidden:
        """The parts as the backend takes them: the stepper's list per layer, the module's hidden."""
        parts = self._parts
        if self.stepper is not None:
            return [(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)] if self._lstm else parts
        return (parts[0], parts[1]) if self._lstm else parts[0]
