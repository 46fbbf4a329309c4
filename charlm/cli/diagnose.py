"""``charlm diagnose``: how far back the gradient reaches, in a run or a fresh model
(:func:`charlm.reports.gradient_report`, :func:`~charlm.reports.fresh_gradient_report`), or the
delayed-recall task (:func:`~charlm.reports.recall_report`), as tables or one JSON object."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from charlm.cli.options import MODEL, AsJson, Data, Device, RunArg, Tag, guard, stderr
from charlm.config import Cell, CheckpointTag
from charlm.errors import ConfigError


def diagnose(
    ctx: typer.Context,
    run: RunArg = None,
    depth: Annotated[int, typer.Option(help="K: measure the gradient k = 0..K steps back.")] = 200,
    batches: Annotated[int, typer.Option(help="Batches of positions to average over.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Positions per batch.")] = 16,
    data: Data = None,
    cell: Annotated[
        Cell | None,
        typer.Option(
            help="Measure a freshly initialised model of this cell instead of a run.", show_default=False
        ),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="Fresh model: layers (default: the cell's).", show_default=False)
    ] = None,
    hidden: Annotated[
        int | None, typer.Option(help="Fresh model: hidden units (default: the cell's).", show_default=False)
    ] = None,
    forget_bias: Annotated[
        float, typer.Option(help="Fresh LSTM (and --task): forget-gate bias.")
    ] = MODEL.forget_bias,
    residual: Annotated[bool, typer.Option(help="Fresh model: residual connections between layers.")] = False,
    task: Annotated[
        bool,
        typer.Option("--task", help="Run the delayed-recall task: train each cell briefly at each distance."),
    ] = False,
    cells: Annotated[str, typer.Option(help="--task: cells to compare.")] = "rnn,irnn,gru,lstm,mingru",
    distances: Annotated[str, typer.Option(help="--task: distances to try.")] = "5,10,20,40,80,160",
    task_steps: Annotated[int, typer.Option(help="--task: training steps per cell and distance.")] = 1000,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG plot here.", show_default=False)] = None,
    as_json: AsJson = False,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (fresh models, the task).")] = 0,
) -> None:
    """Vanishing and exploding gradients: how far back the loss's gradient reaches, per step.

    Measures |d loss(t) / d state(t-k)| for k = 0..K on real batches, the effective memory (where
    it falls below 1/1000 of k = 0) and the spectral radius of each recurrent matrix; with --task,
    which distances each cell learns to bridge.
    """

    def action() -> None:
        from charlm import reports

        if task:
            chosen, lags = _task_lists(cells, distances, task_steps)
            report = reports.recall_report(
                chosen, lags, task_steps, forget_bias, seed, plot, on_result=_recall_progress
            )
        elif cell is not None:
            report = reports.fresh_gradient_report(
                cell, layers, hidden, forget_bias, residual, data, depth, batches, batch_size, device,
                seed, plot,
            )  # fmt: skip
        else:
            from charlm.api import load

            model = load(run, checkpoint, device)
            report = reports.gradient_report(model, data, depth, batches, batch_size, plot)
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            _print_tables(report)

    guard(ctx, action)


def _task_lists(cells: str, distances: str, steps: int) -> tuple[list[Cell], list[int]]:
    """``--cells`` and ``--distances`` as lists, checked with ``--task-steps``."""
    try:
        chosen = [Cell(c.strip()) for c in cells.split(",") if c.strip()]
        lags = [int(d) for d in distances.split(",") if d.strip()]
    except ValueError as exc:
        raise ConfigError(f"--cells / --distances: {exc}") from exc
    if not chosen or not lags or min(lags) < 1 or steps < 1:
        raise ConfigError("--task needs cells, distances of at least 1 and --task-steps of at least 1")
    return chosen, lags


def _recall_progress(cell: Cell, distance: int, accuracy: float) -> None:
    stderr.print(f"[dim]{cell.value} at distance {distance}: accuracy {accuracy:.2f}[/]", highlight=False)


def _print_tables(report: dict[str, Any]) -> None:
    """The report as the terminal tables: recall accuracy, or the gradient chart and the radii."""
    from charlm.cli.render import gradient_table, radii_table, recall_table

    console = Console()
    if "results" in report:  # the delayed-recall task
        results = report["results"]
        accuracy = {r["cell"]: r["accuracy"] for r in results}
        console.print(recall_table(accuracy, {r["cell"]: r["largest"] for r in results}))
        return
    console.print(gradient_table(report["norms"], report["effective_memory"]))
    if report["spectral_radii"]:  # a scan cell has no recurrent matrix
        console.print(radii_table(report["spectral_radii"]))
