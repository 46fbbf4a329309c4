"""A synthetic long-range dependency task: repeat the symbol seen ``distance`` steps earlier.

Each sequence shows one of ``SYMBOLS`` symbols, then blanks, then a query mark ``distance`` steps
after the symbol; the only target is that symbol, at the query (Hochreiter and Schmidhuber's
noise-free long time lag task). Nothing in between helps, so a model succeeds only if it carries
three bits through ``distance`` steps of its recurrence, and learns to, which is exactly what
vanishing gradients prevent. Each cell is trained briefly from scratch at each distance; the
largest distance it learns (accuracy at least ``PASS``) measures its usable memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from charlm.config import Cell, ModelConfig
from charlm.model.network import RNNLM

SYMBOLS = 8
BLANK, QUERY = SYMBOLS, SYMBOLS + 1
VOCAB = SYMBOLS + 2
LR = 3e-3
PASS = 0.9  # accuracy that counts as learned (chance is 1 / SYMBOLS)


def recall_batch(distance: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (distance + 1, B): a symbol, blanks, the query; the one target (at the
    query) is the symbol, every other target is -100 (ignored)."""
    symbol = torch.randint(0, SYMBOLS, (batch,), generator=generator)
    x = torch.full((distance + 1, batch), BLANK)
    x[0], x[distance] = symbol, QUERY
    y = torch.full_like(x, -100)
    y[distance] = symbol
    return x, y


@torch.no_grad()
def recall_accuracy(model: RNNLM, distance: int, generator: torch.Generator, batch: int = 512) -> float:
    """Fraction of scored positions where the most likely symbol is the one ``distance`` back."""
    model.eval()
    x, y = recall_batch(distance, batch, generator)
    logits, _ = model(x)  # (T, B, V)
    scored = y != -100
    return float((logits.argmax(-1)[scored] == y[scored]).float().mean())


@dataclass(frozen=True)
class RecallResult:
    """One cell's accuracy at each distance, and the largest distance it learned."""

    cell: str
    accuracy: dict[int, float]
    largest: int | None  # None: not even the shortest


def train_recall(
    cell: Cell, distance: int, steps: int, hidden: int = 64, seed: int = 0, **model: object
) -> float:
    """Train a fresh one-layer ``cell`` model on the task at ``distance`` for ``steps`` Adam
    steps (batch 32, lr 3e-3, clipped at 1), then return its accuracy on new sequences."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    embed = hidden if cell.scan else 16  # a scan cell embeds in its width
    config = ModelConfig(
        vocab_size=VOCAB,
        cell=cell,
        layers=1,
        hidden=hidden,
        embed=embed,
        dropout=0.0,
        **model,  # type: ignore[arg-type]
    )
    net = RNNLM(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    for _ in range(steps):
        x, y = recall_batch(distance, 32, generator)
        loss, _ = net(x, None, y)  # mean over the queries
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
    return recall_accuracy(net, distance, generator)


def recall_table(
    cells: Sequence[Cell],
    distances: Sequence[int],
    steps: int,
    hidden: int = 64,
    seed: int = 0,
    on_result: Callable[[Cell, int, float], None] = lambda cell, distance, accuracy: None,
    **model: object,
) -> list[RecallResult]:
    """Every cell at every distance (shortest first; a cell stops after two failures in a row);
    ``model`` options (``forget_bias``) go to every model."""
    results = []
    for cell in cells:
        accuracy: dict[int, float] = {}
        failures = 0
        for distance in sorted(distances):
            if failures >= 2:  # longer ones will fail too: save the time
                break
            accuracy[distance] = train_recall(cell, distance, steps, hidden, seed, **model)
            on_result(cell, distance, accuracy[distance])
            failures = failures + 1 if accuracy[distance] < PASS else 0
        learned = [d for d, a in accuracy.items() if a >= PASS]
        results.append(RecallResult(cell.value, accuracy, max(learned) if learned else None))
    return results
