"""The error hierarchy of charlm.

Library code raises these; only the CLI and the server turn them into a message and an exit code
or an HTTP status, so that a user mistake never shows a traceback and a caller embedding charlm can
catch one base class.

The library speaks in its own names: a message that names an option writes the field as a
placeholder (``"{temperature} must not be negative"``, ``fields=("temperature",)``), and each face
words it for its users with :meth:`CharlmError.worded` (``--temp`` in the shell, ``temperature``
in a JSON request). ``str(error)`` writes the field names themselves, as a Python caller knows them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable


class CharlmError(Exception):
    """Base class of every error charlm raises on purpose.

    ``exit_code`` follows the shell convention: 2 for a mistake in what the user asked for
    (options, arguments), 1 for something that went wrong while doing it. ``settled`` is set by the
    training launcher on an error every process of a distributed run agreed on, so that only one
    process reports it.
    """

    exit_code: int = 1
    settled: bool = False

    def __init__(self, message: str = "", *, fields: Iterable[str] = ()) -> None:
        self.template = message
        self.fields = tuple(fields)
        super().__init__(self.worded(lambda name: name))

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with each field named by ``name(field)`` (a flag, a JSON key)."""
        return _worded(self.template, self.fields, name)


class Notice(str):
    """A status line (a warning, what was chosen) that names options: a ``str`` that writes the
    field names, as a Python caller knows them, worded by each face like an error's message
    (``Notice("raise {dropout}", fields=("dropout",)).worded(flag)`` is ``raise --dropout``)."""

    template: str
    fields: tuple[str, ...]

    def __new__(cls, template: str, *, fields: Iterable[str] = ()) -> Notice:
        fields = tuple(fields)
        notice = super().__new__(cls, _worded(template, fields, lambda name: name))
        notice.template, notice.fields = template, fields
        return notice

    def worded(self, name: Callable[[str], str]) -> str:
        """The line with each field named by ``name(field)``."""
        return _worded(self.template, self.fields, name)


def _worded(template: str, fields: tuple[str, ...], name: Callable[[str], str]) -> str:
    if not fields:
        return template
    return re.sub(r"\{(\w+)\}", lambda m: name(m[1]) if m[1] in fields else m[0], template)


class ConfigError(CharlmError):
    """An option or a combination of options that cannot work (usage error)."""

    exit_code = 2


class CorpusError(CharlmError):
    """A training or evaluation text that is missing, unreadable or unusable."""


class TokenizerError(CharlmError):
    """The tokenizer could not be trained or loaded."""


class CheckpointError(CharlmError):
    """A run directory or checkpoint that is missing, damaged or incompatible."""


class TrainingError(CharlmError):
    """Training cannot go on (it diverged beyond recovery)."""


class DeviceError(CharlmError):
    """A device was asked for that this machine does not have."""

    exit_code = 2


class ServeError(CharlmError):
    """The server cannot start: its address is taken or cannot be had."""


class PlotError(CharlmError):
    """A plot's file cannot be written."""
