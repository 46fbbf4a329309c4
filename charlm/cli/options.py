"""What the commands share, declared once: the options several commands take (as ``Annotated``
aliases, with help and defaults from the config dataclasses, so the CLI, the library and the
benchmarks agree), the stderr console, the exit codes, and the guard that turns a library error into
one line and an exit code.

Nothing here imports torch or pydantic: ``charlm --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from charlm.config import CheckpointTag, ModelConfig, SampleConfig, TokenizerConfig, TrainConfig
from charlm.errors import CharlmError, Notice

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

stderr = Console(stderr=True)
T = TypeVar("T")


def defaults(cls: type) -> SimpleNamespace:
    """A config class's declared defaults, read without building one (building one checks it with
    pydantic, which ``--help`` need not import)."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls)})


# Option defaults come from the config dataclasses, so the CLI, the library and the benchmarks agree.
TOK, MODEL, TRAIN, SAMPLE = (defaults(c) for c in (TokenizerConfig, ModelConfig, TrainConfig, SampleConfig))

Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
RunArg = Annotated[
    Path | None,
    typer.Argument(
        help="Run directory; default: the most recent run under checkpoints/.", show_default=False
    ),
]
Tag = Annotated[CheckpointTag, typer.Option(help="Which checkpoint of the run.")]
Encoding = Annotated[str, typer.Option(help="Text encoding of the input text.")]
Data = Annotated[
    list[Path] | None,
    typer.Option(
        help="Use this text instead of the run's held-out split: a file, a directory or a quoted glob "
        "pattern, compressed or not (repeat for several, read as one text).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
# The sampling options `sample` and `chat` share.
Temp = Annotated[float, typer.Option(help="Temperature; 0 picks the most likely token.")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens (0: all).")]
TopP = Annotated[float, typer.Option(help="Sample from the smallest set with this probability (1: all).")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than this times the likeliest (0: off).")]
Length = Annotated[int, typer.Option(help="Tokens to generate per sample (0: none).")]
Seed = Annotated[
    int | None, typer.Option(help="Random seed; the same seed gives the same text.", show_default=False)
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        help="End a sample when its text ends with this (repeatable); not printed.", show_default=False
    ),
]
IncludeStop = Annotated[bool, typer.Option(help="Print the stop string that ended a sample.")]
Ban = Annotated[
    list[str] | None, typer.Option(help="Text that is never produced (repeatable).", show_default=False)
]
RepetitionPenalty = Annotated[
    float, typer.Option(help="Divide recent tokens' positive scores by this (1: off).")
]
PresencePenalty = Annotated[
    float, typer.Option(help="Subtract this from the scores of recent tokens (0: off).")
]
FrequencyPenalty = Annotated[
    float, typer.Option(help="Subtract this per occurrence among recent tokens (0: off).")
]
PenaltyWindow = Annotated[int, typer.Option(help="Recent tokens the penalties count, the prime's included.")]
StateFile = Annotated[
    Path | None,
    typer.Option(help="Start from this state file (see sample --save-state).", show_default=False),
]


def guard(ctx: typer.Context, action: Callable[[], T]) -> T:
    """Run ``action``; turn charlm errors and Ctrl-C into one line and an exit code."""
    try:
        return action()
    except CharlmError as exc:
        if debug(ctx):
            raise
        # An error every rank of a distributed run shares was said once already, by rank 0,
        # through the training launcher's on_error (see charlm.training.launch.train_run).
        if not exc.settled:
            report(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def debug(ctx: typer.Context) -> bool:
    """Whether ``--debug`` asked for full tracebacks."""
    return bool(ctx.obj and ctx.obj.get("debug"))


# A field's option where it is not ``--field-name`` (see :meth:`CharlmError.worded`).
_FLAGS = {
    "kind": "--tokenizer",
    "temperature": "--temp",
    "save_steps": "--save-every",
    "save_seconds": "--save-every",
    "max_prompt_chars": "--max-prompt",
}


def flag(field: str) -> str:
    """The option of the library's field ``field``: ``top_p`` -> ``--top-p``."""
    return _FLAGS.get(field) or "--" + field.replace("_", "-")


def worded(message: str) -> str:
    """A status line in the words of the command line (a :class:`Notice` names options)."""
    return message.worded(flag) if isinstance(message, Notice) else message


def report(exc: CharlmError) -> None:
    """An error, as one line on stderr, in the words of the command line."""
    message = exc.worded(flag)
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def status(message: str) -> None:
    """A line of progress on stderr: dim, or in colour for a warning."""
    message = worded(message)
    style = "bold yellow" if message.startswith("warning:") else "dim"
    stderr.print(f"[{style}]{escape(message)}[/]", highlight=False, soft_wrap=True)


def write(text: str) -> None:
    """Stream text to stdout as soon as it is known."""
    sys.stdout.write(text)
    sys.stdout.flush()
