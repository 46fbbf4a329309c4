"""``charlm novelty``: how much of a text is copied from the run's training corpus
(:func:`charlm.reports.novelty_report`), as a table or one JSON object."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from charlm.cli.options import AsJson, Encoding, RunArg, guard


def novelty(
    ctx: typer.Context,
    run: RunArg = None,
    text: Annotated[
        str, typer.Argument(help="The text to check: a file, or - for stdin (e.g. piped from charlm sample).")
    ] = "-",
    corpus: Annotated[
        list[Path] | None,
        typer.Option(help="Compare with this text instead of the run's training corpus.", show_default=False),
    ] = None,
    as_json: AsJson = False,
    encoding: Encoding = "utf-8",
) -> None:
    """How much of a text is copied from the run's training corpus: the longest span found there
    verbatim, and the fraction of the text's 10-, 20- and 50-character windows that occur there."""

    def action() -> None:
        from charlm.data.prepare import read_corpus
        from charlm.reports import novelty_report

        def read() -> str:  # once the run and its corpus are known
            return sys.stdin.read() if text == "-" else read_corpus([text], encoding)

        report = novelty_report(read, run, corpus, encoding)
        if as_json:
            sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
            return
        from charlm.cli.render import novelty_table

        Console().print(novelty_table(report))

    guard(ctx, action)
