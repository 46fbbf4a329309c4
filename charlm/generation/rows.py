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
        # the rows' state as the backend takes it (the stepper's list per layer, the module's
        # hidden); None while there are no rows
        self._state: list | Hidden | None = None
        self._scores = np.zeros((0, model.config.vocab_size), np.float32)  # (B, V)
        self._joining: list[tuple[list[Part], np.ndarray]] = []  # (state parts, scores) to join

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
            stepper = self.stepper
            parts = self._parts(stepper.zero_state(copies) if stepper else self.model.init_hidden(copies))
        elif self.stepper is not None:
            parts = [np.repeat(a, copies, 0) for a in self._parts(self.stepper.state_from(hidden))]
        else:
            parts = [h.detach().repeat(1, copies, 1) for h in self._parts(hidden)]
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
        if self._joining:
            self._settle()
        return self._scores

    def hidden(self, row: int) -> Hidden:
        """Row ``row``'s state as the module takes it ((layers, 1, S), a pair for the LSTM): a
        copy, to keep (the server's cache of states keeps it to start later rows from)."""
        self._settle()
        parts = self._parts(self._state)
        if self.stepper is not None:  # (B, S) arrays, layer by layer: h (and c) of each
            each = 2 if self._lstm else 1
            stacked = [
                torch.from_numpy(
                    np.stack([parts[i * each + k][row] for i in range(len(parts) // each)])[:, None]
                )
                for k in range(each)
            ]  # (layers, 1, S) each
        else:
            stacked = [part[:, row : row + 1].clone() for part in parts]  # (layers, 1, S) each
        return (stacked[0], stacked[1]) if self._lstm else stacked[0]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in their new order); the others leave."""
        self._settle()
        index = list(rows)
        if index == list(range(len(self._scores))):
            return
        if not index:
            self._state, self._scores = None, self._scores[:0]
            return
        if self.stepper is not None:
            parts = [part[index] for part in self._parts(self._state)]
        else:
            at = torch.tensor(index, dtype=torch.long, device=self.model.device)
            parts = [part.index_select(1, at) for part in self._parts(self._state)]
        self._state, self._scores = self._nested(parts), self._scores[index]

    def step(self, tokens: np.ndarray) -> None:
        """Feed row b the token ``tokens[b]`` (B,): its state and scores move on one token."""
        if self._joining:
            self._settle()
        if self._state is None:
            return
        if self.stepper is not None:  # (NumPy: no autograd to switch off)
            self._scores, self._state = self.stepper.step(tokens, self._state)  # (B, V)
            return
        with torch.no_grad():
            ids = torch.from_numpy(tokens).to(self.model.device).view(1, -1)  # (1, B)
            out, self._state = self.model(ids, self._state)  # (1, B, V)
            self._scores = out[0].float().cpu().numpy()

    def _settle(self) -> None:
        """Make the joins waiting: one concatenation for all of them."""
        if not self._joining:
            return
        pieces = [p for p, _ in self._joining]
        if self._state is not None:
            pieces.insert(0, self._parts(self._state))
        if self.stepper is not None:
            parts = [np.concatenate([p[j] for p in pieces]) for j in range(len(pieces[0]))]
        else:
            parts = [torch.cat([p[j] for p in pieces], 1) for j in range(len(pieces[0]))]
        self._state = self._nested(parts)
        self._scores = np.concatenate([self._scores, *(scores for _, scores in self._joining)])
        self._joining = []

    def _parts(self, state: list | Hidden | None) -> list[Part]:
        """A state (see ``_state``) as a flat list: h and c of each layer (LSTM), or h of each."""
        if self.stepper is not None:
            return [a for layer in state for a in layer] if self._lstm else list(state)  # type: ignore[union-attr]
        return list(state) if isinstance(state, tuple) else [state]  # type: ignore[list-item]

    def _nested(self, parts: list[Part]) -> list | Hidden:
        """:meth:`_parts` undone."""
        if self.stepper is not None:
            return [(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)] if self._lstm else parts
        return (parts[0], parts[1]) if self._lstm else parts[0]  # type: ignore[return-value]
