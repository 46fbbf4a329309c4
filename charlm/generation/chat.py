"""A conversation with a model: each turn the model reads a line and continues it, and its state
carries from turn to turn (a recurrent model's memory of the whole conversation is its state, a few
kilobytes however long the talk). ``charlm chat`` is a terminal face on :class:`Conversation`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from charlm.config import SampleConfig
from charlm.data.tokenizer import Tokenizer
from charlm.errors import ConfigError
from charlm.generation.sampling import Context, generate, make_generator, read
from charlm.model.network import RNNLM

CONTENT = "{content}"


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is written as text for the model: one template per role, in which
    ``{content}`` stands for the message. The default is ``charlm chat``'s transcript: a line
    the user types, then the model's reply, which ends at a blank line; a system message is a
    paragraph of its own before them. A run trained on dialogue of another shape (``Q: ...`` /
    ``A: ...``) can be given its own.

    The assistant's template says where a reply starts and ends: the model is asked to continue
    the text after its part before ``{content}`` (:attr:`reply_start`), and its reply ends at the
    part after (:attr:`reply_end`, the stop string). A past reply is written whole, its end
    included: the text the model read when it said it.
    """

    system: str = "{content}\n\n"
    user: str = "{content}\n"
    assistant: str = "{content}\n\n"

    def __post_init__(self) -> None:
        for role in ("system", "user", "assistant"):
            if getattr(self, role).count(CONTENT) != 1:
                raise ConfigError(f"{{{role}}} must hold {CONTENT} once", fields=(role,))

    @property
    def reply_start(self) -> str:
        """The text before a reply (the assistant's template before ``{content}``)."""
        return self.assistant.partition(CONTENT)[0]

    @property
    def reply_end(self) -> str:
        """The text that ends a reply: its stop string (empty: a reply ends at its length)."""
        return self.assistant.partition(CONTENT)[2]

    def message(self, role: str, content: str) -> str:
        """One message, written in its role's template."""
        return getattr(self, role).replace(CONTENT, content)

    def turn(self, line: str) -> str:
        """What the model reads before it replies to the user's ``line``."""
        return self.message("user", line) + self.reply_start

    def prompt(self, messages: Iterable[tuple[str, str]]) -> str:
        """The text the model reads before its next reply to ``messages`` ((role, content), role
        "system", "user" or "assistant"): each written in its template, then the start of a
        reply. A last message of the assistant is continued, not answered: it is written
        without its end."""
        written = [(role, self.message(role, content)) for role, content in messages]
        if written and written[-1][0] == "assistant":
            end = len(self.reply_end)
            return "".join(text for _, text in written)[: -end or None]
        return "".join(text for _, text in written) + self.reply_start


DEFAULT_FORMAT = ChatFormat()
DEFAULT_STOP = (DEFAULT_FORMAT.reply_end,)  # a reply ends at a blank line


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
