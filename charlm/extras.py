"""Optional parts and the packages they need.

Training, sampling and scoring need only the core dependencies. The server, the chat prompt and
the plots pull in packages most users of the library never touch, so they are extras
(``pip install 'charlm[serve]'``, ``[chat]``, ``[plot]``; ``[all]`` takes them all). Asking for a
part whose extra is missing is a :class:`MissingExtraError`: one line naming the extra to install,
raised before any import of the missing package can fail somewhere deeper with a traceback.
"""

from __future__ import annotations

import importlib.util

from charlm.errors import CharlmError

# the top-level modules each extra installs (kept in step with pyproject.toml's extras)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("starlette", "uvicorn"),
    "chat": ("prompt_toolkit",),
    "plot": ("matplotlib",),
}


class MissingExtraError(CharlmError):
    """A part of charlm was asked for whose optional packages are not installed."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    absent = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every package of ``extra`` is installed.

    Args:
        extra: a key of :data:`EXTRAS`.
        what: the part that needs it, as the user asked for it ("charlm serve").
    """
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{what} needs {', '.join(absent)}, which is not installed: pip install 'charlm[{extra}]'"
        )
