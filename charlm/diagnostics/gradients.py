"""Vanishing and exploding gradients, measured: how far back in time a model's loss still reaches.

Backpropagation through time multiplies the gradient by the recurrent Jacobian once per step, so
the gradient of the loss at step t with respect to the recurrent state at step t-k shrinks (or
grows) roughly geometrically in k. :func:`gradient_norms` measures that curve on real batches; the
distance at which it has fallen below 1/1000 of its value at k = 0 is the model's *effective
memory*. :func:`spectral_radii` gives the spectral radius of every recurrent matrix, per gate,
which bounds the linearised growth rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from charlm.config import Cell
from charlm.model.network import RNNLM

State = list[torch.Tensor]
Step = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]
"""One time step: (input (B, ...), state tensors) -> (output (B, H), new state tensors)."""

GATES = {Cell.lstm: ("input", "forget", "cell", "output"), Cell.gru: ("reset", "update", "new")}
FALL = 1e-3  # the effective memory is where the gradient falls below this fraction of k = 0's
WARMUP = 100  # tokens read (without gradients) before each measured window


def gradient_norms(
    step: Step,
    state: State,
    inputs: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    depth: int,
    batch_dim: int = 0,
) -> torch.Tensor:
    """Norms of d loss(output at the last step) / d state at k steps before it, for k = 0..depth.

    Args:
        step: the recurrence, one time step.
        state: the initial state, tensors with the batch in dimension ``batch_dim``.
        inputs: (T, B, ...) with T > depth.
        loss: per-sample loss (B,) of the last step's output.
        depth: K.

    Returns:
        (K + 1,) the norm of each sample's gradient (its whole state: every layer, h and c),
        averaged over the B samples; entry k is the gradient at step T-1-k.
    """
    steps = inputs.size(0)
    kept: list[State] = []
    for t in range(steps):
        if t == steps - 1 - depth:  # the earliest state asked for: no gradient flows before it
            state = [s.detach().requires_grad_() for s in state]
        if t >= steps - 1 - depth:  # the states whose gradients are asked for
            kept.append(state)
        output, state = step(inputs[t], state)
    grads = torch.autograd.grad(loss(output).sum(), [s for group in kept for s in group], allow_unused=True)
    per_state, batch = len(kept[0]), inputs.size(1)
    norms = []
    for k in range(depth + 1):  # kept[-1] is the state the last step started from: k = 0
        squares = torch.zeros(batch, dtype=torch.float64, device=inputs.device)  # (B,)
        for g in grads[(len(kept) - 1 - k) * per_state : (len(kept) - k) * per_state]:
            if g is not None:  # the whole state of each sample: every layer, h and c
                squares += g.movedim(batch_dim, 0).flatten(1).double().pow(2).sum(1)
        norms.append(squares.sqrt().mean())
    return torch.stack(norms)


def effective_memory(norms: torch.Tensor, fall: float = FALL) -> int | None:
    """The first distance k at which ``norms`` (K + 1,) is below ``fall`` times its value at k = 0,
    or None if it never falls that far within K."""
    below = (norms < norms[0] * fall).nonzero()
    return int(below[0]) if below.numel() else None


def model_step(model: RNNLM) -> Step:
    """The recurrence of ``model`` as a :data:`Step` over token ids (B,), its state as a list:
    [h] for GRU and RNN, [h, c] for LSTM, each (layers, B, H)."""

    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hidden = (state[0], state[1]) if model.config.cell is Cell.lstm else state[0]
        output, hidden = model.features(tokens.view(1, -1), hidden)  # (1, B, H)
        return output[0], list(hidden) if isinstance(hidden, tuple) else [hidden]

    return step


@dataclass(frozen=True)
class GradientReport:
    """What ``charlm diagnose`` measures on one model."""

    norms: list[float]  # k = 0..K, averaged over positions and batches
    effective_memory: int | None  # None: more than K
    spectral_radii: dict[str, float]  # "layer 0 forget" -> radius


def diagnose_model(
    model: RNNLM, ids: torch.Tensor, depth: int, batches: int, batch_size: int, warmup: int = WARMUP
) -> GradientReport:
    """Measure ``model`` (in eval mode: no dropout) on windows of ``ids`` (N,): ``batches`` times
    ``batch_size`` positions spread over the text, each the last step of a window of depth + 1
    tokens whose targets are the next tokens, entered with the state reached by reading the
    ``warmup`` tokens before it (a state in use, not the zero state of a text's start).

    Raises:
        ValueError: ``ids`` too short for one window.
    """
    length = warmup + depth + 2
    if ids.numel() < length + 1:
        raise ValueError(f"the text has {ids.numel()} tokens; measuring to depth {depth} needs {length + 1}")
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, ids.numel() - length - 1, batches * batch_size).long()
    total = torch.zeros(depth + 1, dtype=torch.float64)
    step = model_step(model)
    for chunk in starts.split(batch_size):
        window = torch.stack([ids[s : s + length].long() for s in chunk.tolist()], 1)  # (T, B)
        window = window.to(model.device)
        with torch.no_grad():
            _, hidden = model.features(window[:warmup]) if warmup else (None, model.init_hidden(len(chunk)))
        state = list(hidden) if isinstance(hidden, tuple) else [hidden]
        target = window[-1]  # (B,): the token after the last input

        def loss(output: torch.Tensor, target: torch.Tensor = target) -> torch.Tensor:
            return F.cross_entropy(model.logits(output).float(), target, reduction="none")  # (B,)

        # cuDNN refuses backward in eval mode; the measurement does not need its speed
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            norms = gradient_norms(step, state, window[warmup:-1], loss, depth, batch_dim=1)
            total += norms.cpu() * chunk.numel()
    model.train(was_training)
    norms = total / starts.numel()
    return GradientReport(norms.tolist(), effective_memory(norms), spectral_radii(model))


def spectral_radii(model: RNNLM) -> dict[str, float]:
    """The spectral radius (largest |eigenvalue|) of each layer's recurrent matrix, per gate; none
    for a scan cell, which has no recurrent matrix (its gradient through time is the product of
    its decays alone)."""
    cell, hidden = model.config.cell, model.config.hidden
    if cell.scan:
        return {}
    gates: Sequence[str] = GATES.get(cell, ("recurrent",))
    radii = {}
    for layer in range(model.config.layers):
        weight = model.recurrent("weight_hh", layer).detach().double().cpu()  # (G * H, H)
        for i, gate in enumerate(gates):
            block = weight[i * hidden : (i + 1) * hidden]  # (H, H)
            radii[f"layer {layer} {gate}"] = float(torch.linalg.eigvals(block).abs().max())
    return radii


def fresh_model(cell: Cell, layers: int, hidden: int, vocab_size: int, **options: object) -> RNNLM:
    """A freshly initialised model, as ``charlm train`` would start it (no dropout)."""
    from charlm.config import ModelConfig

    config = ModelConfig(
        vocab_size=vocab_size, cell=cell, layers=layers, hidden=hidden, embed=hidden, dropout=0.0, **options
    )
    return RNNLM(config)
