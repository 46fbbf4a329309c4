"""Loss, perplexity and bits per character over a text, the one definition used by train and eval.

Every token of the text is scored once, each from the tokens before it (the first from a newline
context), so the total loss in nats is a property of the model and the text alone:

- loss (nats per token)       = total / tokens
- perplexity per token        = exp(loss)
- bits per character (bpc)    = total / (ln 2 * characters)

bpc divides by characters, not tokens, so runs with different tokenizers compare on one scale.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from charlm.config import DYNAMIC_DECAY, DYNAMIC_LR, DYNAMIC_WINDOW, EVAL_CONTEXT
from charlm.data.batches import eval_streams
from charlm.data.tokenizer import Tokenizer
from charlm.model.network import RNNLM, Hidden, detach_hidden

EVAL_STREAMS = 32
EVAL_WINDOW = 256


@dataclass(frozen=True)
class EvalResult:
    """The score of a model on a text."""

    tokens: int
    characters: int
    loss: float  # mean nats per token
    perplexity: float  # per token
    bpc: float  # bits per character

    def to_dict(self) -> dict[str, float | int]:
        """Plain data for JSON output."""
        return asdict(self)


def score(total_nats: float, tokens: int, characters: int) -> EvalResult:
    """Turn a summed loss into the reported figures (see the module docstring)."""
    loss = total_nats / tokens
    return EvalResult(
        tokens=tokens,
        characters=characters,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        bpc=total_nats / (math.log(2) * characters),
    )


def evaluate(
    model: RNNLM,
    ids: torch.Tensor,
    characters: int,
    start_id: int,
    streams: int = EVAL_STREAMS,
    window: int = EVAL_WINDOW,
    autocast: torch.dtype | None = None,
    context: int = EVAL_CONTEXT,
) -> EvalResult:
    """Score ``ids`` (N,), the encoding of a text of ``characters`` characters.

    The text is cut into ``streams`` contiguous pieces evaluated in parallel, the hidden state
    carried across windows; each piece after the first reads the ``context`` tokens before it
    first (at most the piece before it), unscored, so the figure is that of one stream reading the
    text in order (for a model whose memory is shorter than what each piece reads, exactly). The
    layout depends only on N, so the same text always gets the same figure, in training and in
    ``charlm eval``. ``autocast`` (bf16) runs the model's matrix products in that dtype, as the
    run trained; the loss is summed in fp32 and fp64.
    """
    total = total_nats(model, ids, start_id, streams, window, autocast, context=context)
    return score(total.item(), ids.numel(), characters)


@torch.no_grad()
def total_nats(
    model: RNNLM,
    ids: torch.Tensor,
    start_id: int,
    streams: int = EVAL_STREAMS,
    window: int = EVAL_WINDOW,
    autocast: torch.dtype | None = None,
    part: tuple[int, int] = (0, 1),
    context: int = EVAL_CONTEXT,
) -> torch.Tensor:
    """The summed loss (nats, a float64 scalar on the model's device) of ``ids`` (N,) in the
    layout of :func:`evaluate`, or of part ``i`` of ``n`` of its streams (``part=(i, n)``): the
    ranks of a distributed run each score a part and sum them."""
    was_training = model.training
    model.eval()
    device = model.device
    layout = eval_streams(ids, start_id, streams, context)
    columns = torch.tensor_split(torch.arange(layout.inputs.size(1)), part[1])[part[0]]
    hidden = None
    total = torch.zeros((), dtype=torch.float64, device=device)
    if layout.context.numel() and columns.numel():  # each piece reads the text before it, unscored
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            _, hidden = model.features(layout.context[:, columns].to(device), None)  # (W, b) read
        if columns[0] == 0:  # the first piece starts the text: from nothing
            hidden = _restart(hidden, 0)
    for i in range(0, layout.inputs.size(0) if columns.numel() else 0, window):
        x = layout.inputs[i : i + window, columns].to(device)  # (w, b)
        y = layout.targets[i : i + window, columns].to(device)  # (w, b)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            output, hidden = model.features(x, hidden)  # (w, b, H)
            total += model.loss(output, y, reduction="sum").double()
    model.train(was_training)
    return total


def _restart(hidden: Hidden, stream: int) -> Hidden:
    """``hidden`` with stream ``stream``'s state zero, as a stream that has read nothing has it."""
    if isinstance(hidden, tuple):
        return tuple(_restart(h, stream) for h in hidden)  # type: ignore[return-value]
    hidden = hidden.clone()
    hidden[:, stream] = 0
    return hidden


def evaluate_text(
    model: RNNLM, tokenizer: Tokenizer, text: str, autocast: torch.dtype | None = None
) -> EvalResult:
    """Score a text: the path ``charlm eval`` takes, identical to training's validation of the
    held-out split (which encodes the same text with the same tokenizer) in the same precision."""
    ids = torch.from_numpy(tokenizer.encode_array(text))
    return evaluate(model, ids, len(text), tokenizer.newline_id, autocast=autocast)


def dynamic_nats(
    model: RNNLM,
    ids: torch.Tensor,
    start_id: int,
    lr: float = DYNAMIC_LR,
    decay: float = DYNAMIC_DECAY,
    window: int = DYNAMIC_WINDOW,
    autocast: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The summed loss (nats, float64) of ``ids`` (N,) under dynamic evaluation (Krause et al.
    2018): the text is read in order as one stream, ``window`` tokens at a time; each window is
    scored first, then the model takes one SGD step (``lr``) on that window's mean loss and is
    pulled back towards the trained weights by ``decay`` of the difference. Every token is
    predicted before the model learns from it, so the figure is a fair score of a model that
    adapts to the names and the style that recur in a text, as a reader does.

    A copy of ``model`` adapts; ``model`` itself (and so the run on disk) is left as it was.
    """
    adapted = copy.deepcopy(model)
    # Training mode (cuDNN runs backward only there) without dropout: scored as statically.
    adapted.config = dataclasses.replace(adapted.config, dropout=0.0, weight_drop=0.0)
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    device = adapted.device
    ids = ids.long()
    inputs = torch.cat([torch.tensor([start_id]), ids[:-1]]).to(device)  # (N,): the token before each
    targets = ids.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    hidden = None
    n = ids.numel()
    for i in range(0, n, window):
        x = inputs[i : i + window].unsqueeze(1)  # (w, 1)
        y = targets[i : i + window].unsqueeze(1)  # (w, 1)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            output, hidden = adapted.features(x, hidden)  # (w, 1, H)
            nats = adapted.loss(output, y, reduction="sum")
        total += nats.detach().double()
        adapted.zero_grad(set_to_none=True)
        (nats / y.numel()).backward()
        with torch.no_grad():
            for p, p0 in zip(params, trained, strict=True):
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                if decay:
                    p.add_(p0 - p, alpha=decay)
        hidden = detach_hidden(hidden)
        if progress is not None:
            progress(min(i + window, n), n)
    return total


def evaluate_dynamic(
    model: RNNLM,
    tokenizer: Tokenizer,
    text: str,
    autocast: torch.dtype | None = None,
    lr: float = DYNAMIC_LR,
    decay: float = DYNAMIC_DECAY,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score a text with dynamic evaluation (see :func:`dynamic_nats`)."""
    ids = torch.from_numpy(tokenizer.encode_array(text))
    total = dynamic_nats(model, ids, tokenizer.newline_id, lr, decay, autocast=autocast, progress=progress)
    return score(total.item(), ids.numel(), len(text))
