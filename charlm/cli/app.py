"""The ``charlm`` command line: the Typer app and its commands, one module each
(``charlm/cli/train.py``, ``sample.py``, ...), the options they share in ``options.py``. Each
command parses, calls one library function, renders its result, and turns library errors
(:class:`CharlmError`) into one line on stderr and an exit code.

Heavy imports (torch, sentencepiece) happen inside the commands, so ``charlm --help`` is instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from charlm.cli import chat, diagnose, eval, novelty, plot, sample, serve, train
from charlm.cli.options import EXIT_INTERRUPTED

app = typer.Typer(
    name="charlm",
    help="Train, sample and evaluate recurrent (LSTM/GRU/RNN) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# in the order `charlm --help` lists them
for name, command in (
    ("train", train.train),
    ("sample", sample.sample),
    ("chat", chat.chat),
    ("eval", eval.eval_),
    ("diagnose", diagnose.diagnose),
    ("novelty", novelty.novelty),
    ("serve", serve.serve),
    ("plot", plot.plot),
):
    app.command(name)(command)


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(help="Show full tracebacks for errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


def main() -> None:
    """Entry point of the ``charlm`` console script.

    Under torchrun every rank parses the same command line, so a mistake in it is said once, by
    rank 0 (as every error of a distributed run is): the other ranks leave with its exit code.
    """
    if os.environ.get("RANK", "0") == "0":
        app()
        return
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # a usage error
        code = exc.exit_code
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
