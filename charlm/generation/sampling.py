"""Sampling text from a trained model: temperature, top-k, top-p (nucleus), a prime text, seeds,
several samples at once, and streaming output one piece at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.data.tokenizer import StreamDecoder, Tokenizer
from charlm.model.network import RNNLM
from charlm.model.stepper import Stepper


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` most likely tokens and, of those, all but the smallest
    set whose probability reaches ``top_p``, along the last dimension of ``logits`` (..., V);
    0 and 1 switch a filter off."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


class Picker:
    """Chooses the next token of each of B streams from their logits, by ``config``.

    Sampling inverts the cumulative distribution with one uniform number per row, in float64 so a
    token of probability 0 is never hit: the draw ``torch.multinomial`` makes, done in NumPy with
    the uniform numbers drawn from ``generator`` a block at a time, since one token at a time
    pays per-call costs that dwarf the arithmetic (V is a few hundred).
    """

    _BLOCK = 4096  # uniform numbers drawn at once: 4096 steps of one stream, fewer of many

    def __init__(self, config: SampleConfig, generator: torch.Generator) -> None:
        self.config, self.generator = config, generator
        self._uniform = np.empty((0, 0))
        self._used = 0

    def __call__(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Token ids (B,) for ``logits`` (B, V)."""
        config = self.config
        x = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
        if config.temperature == 0:
            return x.argmax(axis=-1)
        x = x.astype(np.float64) / config.temperature
        if config.top_k > 0 or config.top_p < 1:
            x = filter_logits(torch.from_numpy(x), config.top_k, config.top_p).numpy()
        cdf = np.cumsum(np.exp(x - x.max(axis=-1, keepdims=True)), axis=-1)  # unnormalised, (B, V)
        u = self._next(x.shape[0])[:, None] * cdf[:, -1:]  # (B, 1)
        ids = (cdf <= u).sum(axis=-1)  # the first index whose cdf exceeds u (cdf never decreases)
        # u rounded up to the total (about one draw in 2**53): the most likely, never a masked one
        return np.where(ids < x.shape[1], ids, x.argmax(axis=-1))

    def _next(self, streams: int) -> np.ndarray:
        """The next B uniform numbers in [0, 1)."""
        if self._used >= self._uniform.shape[0] or self._uniform.shape[1] != streams:
            rows = max(1, self._BLOCK // streams)
            block = torch.rand((rows, streams), generator=self.generator, dtype=torch.float64)
            self._uniform, self._used = block.numpy(), 0
        self._used += 1
        return self._uniform[self._used - 1]


@torch.no_grad()
def generate(
    model: RNNLM, tokenizer: Tokenizer, config: SampleConfig, generator: torch.Generator
) -> Iterator[tuple[int, str]]:
    """Yield (sample number, piece) for ``config.num_samples`` continuations of ``config.prime``
    (the prime itself not included), all sampled at once, as each piece becomes certain.

    The model first reads a newline (the start-of-text context it was scored with) and the prime
    in one pass, then feeds back the tokens it picks, one row per sample: through a
    :class:`Stepper` on the CPU, through the module (cuDNN) on a GPU.
    """
    model.eval()
    device = model.device
    n = config.num_samples
    context = [tokenizer.newline_id, *tokenizer.encode(config.prime)]
    logits, hidden = model(torch.tensor(context, device=device).view(-1, 1))  # (T, 1, V)
    # every sample starts from the prime's state: (layers, n, H)
    hidden = tuple(h.repeat(1, n, 1) for h in hidden) if isinstance(hidden, tuple) else hidden.repeat(1, n, 1)
    last = logits[-1].repeat(n, 1)  # (n, V)
    decoders = [StreamDecoder(tokenizer) for _ in range(n)]
    picker = Picker(config, generator)
    stepper = Stepper(model) if device.type == "cpu" else None
    state = stepper.state_from(hidden) if stepper else hidden
    for _ in range(config.length):
        # No text encodes to the unknown piece (byte fallback), so the model must never say it.
        last[:, tokenizer.unk_id] = -math.inf
        ids = picker(last)  # (n,)
        for i, next_id in enumerate(ids.tolist()):
            text = decoders[i].push(next_id)
            if text:
                yield i, text
        if stepper is not None:
            last, state = stepper.step(ids, state)  # (n, V), NumPy
        else:
            logits, state = model(torch.from_numpy(ids).to(device).view(1, n), state)  # (1, n, V)
            last = logits[0]
    for i, decoder in enumerate(decoders):
        tail = decoder.flush()
        if tail:
            yield i, tail


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator: seeded for reproducible text, else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
