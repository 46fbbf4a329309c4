"""``charlm plot``: a run's training curves as a PNG (:func:`charlm.reports.training_plot`). Needs
the ``plot`` extra (matplotlib): without it, one line says how to get it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from charlm.cli.options import RunArg, guard, stderr


def plot(
    ctx: typer.Context,
    run: RunArg = None,
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: RUN/training.png).", show_default=False)
    ] = None,
) -> None:
    """Draw a run's training and validation loss, bits per character, gradient norm (and clipped
    fraction) and learning rate to a PNG."""

    def action() -> None:
        from charlm.reports import training_plot

        path = training_plot(run, out)
        stderr.print(f"wrote {escape(str(path))}", highlight=False)

    guard(ctx, action)
