"""Token ids -> parallel streams -> BPTT windows, and the layout that scores every token once.

Teacher forcing with truncated backpropagation through time (TBPTT) sees the token stream as
``batch_size`` parallel streams, each a contiguous slice of the corpus, so a hidden state carried
from one window to the next continues the same text::

    corpus  a b c d e f g h i j k l m n o p q r s t u v w x      (24 tokens, batch_size 4)

    streams (T=6, B=4)       window t (bptt 2):  x = rows t..t+1, y = rows t+1..t+2
      a g m s
      b h n t                 x: a g m s   y: b h n t
      c i o u                    b h n t      c i o u
      d j p v
      e k q w
      f l r x

Row ``i`` of window ``k+1`` follows row ``i`` of window ``k`` in the text, so the final hidden state
of one window is the right initial state of the next (detached, to truncate the gradient).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay ``ids`` (N,) out as ``batch_size`` contiguous streams: a view (B, N // B), no copy, so
    the ids may stay memory-mapped on disk. Row b is stream b, the columns of the diagram above.

    The last ``N % batch_size`` tokens are dropped (less than one per stream).
    """
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length)  # (B, L)


def windows(streams: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (input, target) windows of ``streams`` (B, L), each (<=bptt, B), target = input
    shifted one step ahead in time, from window number ``start``."""
    for index in range(start, count_windows(streams, bptt)):
        yield window(streams, index, bptt)


def count_windows(streams: torch.Tensor, bptt: int) -> int:
    """How many BPTT windows one pass over ``streams`` (B, L) has."""
    return -(-(streams.size(1) - 1) // bptt)  # ceil


def window(streams: torch.Tensor, index: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window number ``index`` of ``streams`` (B, L): input steps index*bptt .. +bptt-1 as (<=bptt, B)
    int64, and the targets one step later. Addressed by number, so a resumed run continues at the
    exact window it stopped at. Only this window is read (from disk if the ids are mapped)."""
    i = index * bptt
    n = min(bptt, streams.size(1) - 1 - i)
    block = streams[:, i : i + n + 1].t().contiguous().long()  # (n + 1, B)
    return block[:-1], block[1:]


@dataclass(frozen=True)
class EvalStreams:
    """A token stream laid out for evaluation: every token is scored exactly once.

    inputs/targets are (T, B); the stream is cut into B nearly equal contiguous pieces, the
    first input is the newline (a start-of-text context), and padding targets are -100 (ignored).
    ``context`` (W, B) holds, for every piece but the first, the W inputs before its own: read
    first and not scored, they give its first tokens the text before them, as one stream read in
    order would (the first piece starts the text, from nothing).
    """

    inputs: torch.Tensor  # (T, B)
    targets: torch.Tensor  # (T, B)
    tokens: int
    context: torch.Tensor  # (W, B); column 0 is not a context (the first piece reads none)


def eval_streams(ids: torch.Tensor, start_id: int, streams: int, context: int = 0) -> EvalStreams:
    """Lay out ``ids`` (N,) so that all N tokens are predicted, each from the tokens before it:
    the pieces after the first read up to ``context`` inputs before their own (the piece before
    theirs, where pieces are shorter than that: a text of up to 32 x 128 tokens)."""
    ids, n = ids.long(), ids.numel()
    streams = max(1, min(streams, n))
    length = -(-n // streams)  # ceil
    inputs = torch.full((streams * length,), start_id, dtype=torch.long)
    targets = torch.full((streams * length,), -100, dtype=torch.long)
    inputs[1:n] = ids[: n - 1]
    targets[:n] = ids
    # piece b's context: inputs b*length - w .. b*length - 1 (for the second piece at most the
    # first's inputs, the start of text included)
    w = min(context, length) if streams > 1 else 0
    starts = torch.arange(streams) * length - w  # (B,)
    where = (starts[None, :] + torch.arange(w)[:, None]).clamp(min=0)  # (W, B)
    # (B, T) -> (T, B): stream b holds tokens b*length .. (b+1)*length-1
    return EvalStreams(
        inputs.view(streams, length).t().contiguous(),
        targets.view(streams, length).t().contiguous(),
        n,
        inputs[where],
    )


def token_counts(ids: torch.Tensor, vocab_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """How often each token occurs in ``ids`` (N,), (V,), counted a chunk at a time (the ids may
    be memory-mapped and larger than memory)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, ids.numel(), chunk):
        counts += torch.bincount(ids[start : start + chunk].long(), minlength=vocab_size)
    return counts
