"""``charlm eval``: a run's score on held-out text (:func:`charlm.reports.eval_report`), as a table
or one JSON object."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from charlm.cli.options import AsJson, Data, Device, Encoding, RunArg, Tag, guard, stderr
from charlm.config import DYNAMIC_DECAY, DYNAMIC_LR, CheckpointTag, Precision


def eval_(
    ctx: typer.Context,
    run: RunArg = None,
    data: Data = None,
    perplexity: Annotated[
        bool,
        typer.Option("--perplexity", help="Report perplexity and bits per character (the default report)."),
    ] = True,
    as_json: AsJson = False,
    checkpoint: Tag = CheckpointTag.best,
    encoding: Encoding = "utf-8",
    device: Device = "auto",
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="auto, fp32 or bf16 (default: the run's own, as its training validated; bf16 "
            "scores differ from fp32 in about the fifth digit).",
            show_default=False,
        ),
    ] = None,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic",
            help="Also score with dynamic evaluation: the model learns from each window right after "
            "scoring it (the run's weights on disk are not changed).",
        ),
    ] = False,
    dynamic_lr: Annotated[float, typer.Option(help="--dynamic: learning rate of each update.")] = DYNAMIC_LR,
    dynamic_decay: Annotated[
        float, typer.Option(help="--dynamic: pull towards the trained weights at each update.")
    ] = DYNAMIC_DECAY,
) -> None:
    """Score held-out text: tokens, loss (nats), perplexity per token, bits per character."""

    def action() -> None:
        from charlm.api import load
        from charlm.cli.render import TrainProgress, eval_table
        from charlm.reports import eval_report

        model = load(run, checkpoint, device)
        with TrainProgress(stderr) as bar:  # a bar only while dynamic evaluation runs
            report = eval_report(
                model, data, encoding, precision, dynamic, dynamic_lr, dynamic_decay,
                progress=lambda done, total: bar.on_progress("dynamic evaluation", done, total),
            )  # fmt: skip
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            Console().print(eval_table(f"{model.path} on {report['data']}", report))

    guard(ctx, action)
