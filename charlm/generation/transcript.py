"""How a conversation is written as text for the model (:class:`ChatFormat`): apart from
:mod:`charlm.generation.chat`, whose conversations need the model, so that the server's HTTP
process, which writes chat requests as prompts but never runs a model, does not import PyTorch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from charlm.errors import ConfigError

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
