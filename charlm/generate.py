"""Sampling text from a trained model: temperature, top-k, top-p (nucleus), a prime text, seeds,
and streaming output one piece at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from charlm.config import SampleConfig
from charlm.model import RNNLM
from charlm.stepper import Stepper
from charlm.tokenizer import StreamDecoder, Tokenizer


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` most likely tokens and, of those, all but the smallest
    set whose probability reaches ``top_p``. ``logits`` is (V,); 0 and 1 switch a filter off."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def pick(logits: torch.Tensor, config: SampleConfig, generator: torch.Generator) -> int:
    """Choose the next token id from ``logits`` (V,)."""
    if config.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: RNNLM, tokenizer: Tokenizer, config: SampleConfig, generator: torch.Generator
) -> Iterator[str]:
    """Yield the continuation of ``config.prime`` piece by piece (the prime itself not included).

    The model first reads a newline (the start-of-text context it was scored with) and the prime
    in one pass, then feeds back each token it picks through a :class:`Stepper`.
    """
    model.eval()
    device = model.decoder.weight.device
    context = [tokenizer.newline_id, *tokenizer.encode(config.prime)]
    logits, hidden = model(torch.tensor(context, device=device).view(-1, 1))  # (T, 1, V)
    last = logits[-1, 0]  # (V,)
    # No text encodes to the unknown piece (byte fallback), so the model must never say it.
    never = torch.zeros_like(last).index_fill_(0, torch.tensor([tokenizer.unk_id], device=device), -math.inf)
    decoder = StreamDecoder(tokenizer)
    stepper = Stepper(model)  # one token at a time without nn.LSTM's per-call cost
    state = stepper.state_from(hidden)
    token = torch.empty((1,), dtype=torch.long, device=device)
    for _ in range(config.length):
        next_id = pick((last + never).cpu(), config, generator)
        text = decoder.push(next_id)
        if text:
            yield text
        token.fill_(next_id)
        logits, state = stepper.step(token, state)  # (1, V)
        last = logits[0]
    tail = decoder.flush()
    if tail:
        yield tail


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU random generator: seeded for reproducible text, else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
