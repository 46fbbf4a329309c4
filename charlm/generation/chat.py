"""A conversation with a model: each turn the model reads a line and continues it, and its state
carries from turn to turn (a recurrent model's memory of the whole conversation is its state, a few
kilobytes however long the talk). ``charlm chat`` is a terminal face on :class:`Conversation`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from charlm.config import SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.generation.sampling import Context, generate, make_generator, read
from charlm.generation.transcript import CONTENT, DEFAULT_FORMAT, DEFAULT_STOP, ChatFormat
from charlm.model.network import RNNLM

__all__ = ["CONTENT", "DEFAULT_FORMAT", "DEFAULT_STOP", "ChatFormat", "Conversation"]


class Conversation:
    """Turns of text with one model. ``config`` sets the sampling (its ``prime`` and
    ``num_samples`` are not used: each turn is one reply to the line given); with a ``seed``, the
    same lines get the same replies.

    Args:
        start: a state to begin from (a state file's), else a start-of-text context.
        chat_format: how a line and a reply are written (the stop strings are ``config``'s).
    """

    def __init__(
        self,
        model: RNNLM,
        tokenizer: Tokenizer,
        config: SampleConfig,
        start: Context | None = None,
        chat_format: ChatFormat = DEFAULT_FORMAT,
    ) -> None:
        self.model, self.tokenizer, self.format = model, tokenizer, chat_format
        self.config = dataclasses.replace(config, prime="", num_samples=1)
        self.context = start if start is not None else read(model, tokenizer, "")
        self.generator = make_generator(config.seed)

    def reply(self, line: str) -> Iterator[str]:
        """Read ``line`` (as the chat format writes it: a newline is added), then yield the
        model's continuation in pieces until a stop string, ``config.length`` tokens, or the
        caller stops iterating (Ctrl-C): what was said, the stop string included, becomes part
        of the state either way."""
        self.context = read(self.model, self.tokenizer, self.format.turn(line), self.context)
        said: list[str] = []
        config = dataclasses.replace(self.config, include_stop=True)  # the state hears all of it
        try:
            for _, piece in generate(self.model, self.tokenizer, config, self.generator, self.context):
                said.append(piece)
                yield _without_stop(piece, said, self.config)
        finally:  # also when the caller stops early: the state keeps what was said
            text = "".join(said)
            if text:
                self.context = read(self.model, self.tokenizer, text, self.context)

    @property
    def state(self) -> Context:
        """The state after everything read and said so far (to save as a state file)."""
        return self.context


def _without_stop(piece: str, said: list[str], config: SampleConfig) -> str:
    """``piece`` as shown: without the stop string that ends the reply, unless ``include_stop``."""
    if config.include_stop or not config.stop:
        return piece
    text = "".join(said)
    for stop in sorted(config.stop, key=len, reverse=True):  # as StopMatcher: the longest ending there
        if text.endswith(stop):
            return piece[: max(0, len(piece) - len(stop))]
    return piece
