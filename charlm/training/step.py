"""The training step and its optimizer: teacher forcing on one TBPTT window, clipped, in bf16
autocast where the hardware runs it natively, skipping any update that is not finite."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from charlm.model.network import RNNLM, Hidden


def train_step(
    model: RNNLM,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: Hidden,
    clip: float,
    autocast: torch.dtype | None = None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Hidden, bool]:
    """One teacher-forced TBPTT update on a window, unless the loss or the gradient is not finite:
    then the weights and the optimizer are left untouched.

    Args:
        x, y: (T, B) inputs and targets (y is x one step ahead).
        hidden: the state carried from the previous window, already detached.
        autocast: run the forward pass under autocast to this dtype (bf16), or None for fp32;
            the weights, the gradients and the optimizer stay in fp32.
        agree: in a distributed run, makes the ranks' "not finite" flags (a scalar, 1 = not
            finite) one (the maximum), so all ranks skip a step together.

    Returns:
        The mean loss, the gradient norm before clipping, the new hidden state, and whether the
        update was applied.
    """
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss, new_hidden = model(x, hidden, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)  # global norm, NaN if any is
    bad = (~torch.isfinite(loss.detach() + grad_norm)).float()
    finite = not bool(agree(bad) if agree else bad)  # one sync a step: the price of safety
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm.detach(), new_hidden, finite
