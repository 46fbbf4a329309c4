"""The error hierarchy of charlm.

Library code raises these; only the CLI turns them into a one-line message and an exit code, so
that a user mistake never shows a traceback and a caller embedding charlm can catch one base class.
"""

from __future__ import annotations


class CharlmError(Exception):
    """Base class of every error charlm raises on purpose.

    ``exit_code`` follows the shell convention: 2 for a mistake in what the user asked for
    (options, arguments), 1 for something that went wrong while doing it.
    """

    exit_code: int = 1


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
