"""Rich rendering of training progress and results, on stderr (stdout is for sampled text and
JSON). Implements :class:`charlm.training.report.Callbacks`."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from charlm.cli.options import worded

if TYPE_CHECKING:
    from charlm.training.report import StepReport, TrainResult


class _TwoLineProgress(Progress):
    """A progress bar with the training figures on a second line, so it fits 80 columns."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        self.figures = Text()  # set first: the base class renders while it initialises
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self.figures


def _shown(ch: str) -> str:
    """A character of a sample as one line of a terminal or log shows it."""
    if ch == "\n":
        return "⏎ "
    if ch != "\t" and unicodedata.category(ch) == "Cc":
        return f"\\x{ord(ch):02x}"
    return ch


class TrainProgress:
    """A live progress bar for ``charlm train`` plus a line per validation.

    Args:
        console: where to draw (a stderr console in the CLI).
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = _TwoLineProgress(
            TextColumn("[bold]epoch {task.fields[epoch]}[/] step {task.fields[step]:,}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            expand=True,
        )
        self._task = self._progress.add_task("train", total=1.0, start=False, epoch="-", step=0)
        self._data: Progress | None = None
        self._data_tasks: dict[str, TaskID] = {}

    def __enter__(self) -> TrainProgress:
        return self  # the bar appears with the first step: a run refused before it shows none

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._data is not None:
            self._data.stop()
        if self._progress.live.is_started:
            self._progress.stop()

    def on_status(self, message: str) -> None:
        """A phase of the run (tokenizer, encoding, model size), or a warning (in colour)."""
        message = worded(message)
        style = "bold yellow" if message.startswith("warning:") else "dim"
        self._progress.console.print(f"[{style}]{escape(message)}[/]", soft_wrap=True, highlight=False)

    def on_progress(self, task: str, done: int, total: int) -> None:
        """A bar for a long pass over the corpus (reading, encoding), gone when it is done; none
        where stderr is not a terminal (a log), where a transient bar leaves a blank line."""
        if not self.console.is_terminal:
            return
        if self._data is None:
            self._data = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=None), TaskProgressColumn(),
                TimeRemainingColumn(), console=self.console, transient=True,
            )  # fmt: skip
        if task not in self._data_tasks:
            self._data_tasks[task] = self._data.add_task(task, total=total)
            self._data.start()
        self._data.update(self._data_tasks[task], completed=done, total=total)
        if done >= total:
            self._data.stop()
            self._data, self._data_tasks = None, {}

    def on_step(self, report: StepReport) -> None:
        """Update the bar from a :class:`charlm.training.report.StepReport`; no bar where stderr is
        not a terminal: rich draws a live bar there only once, when it stops, with the figures of
        the last report (every 10 steps), so a log ended with a stale "step 20 ... 80%" line. The
        validation lines and the summary say it all there."""
        if not self.console.is_terminal:
            return
        self._progress.start()  # a no-op once started
        self._progress.start_task(self._task)
        self._progress.update(
            self._task,
            completed=report.fraction,
            epoch=f"{report.epoch}/{report.epochs}" if report.epochs else str(report.epoch),
            step=report.step,
        )
        self._progress.figures = Text(
            f"loss {report.loss:.3f}  ppl {math.exp(min(report.loss, 700)):.2f}  "
            f"bpc {report.bpc:.3f}  lr {report.lr:.3g}  "
            f"|grad| {report.grad_norm:.2f} clip {report.clipped:.0%}  {report.tokens_per_sec:,.0f} tok/s",
            style="cyan",
        )

    def on_sample(self, step: int, text: str) -> None:
        """What the model writes at this step, kept above the bar (a line break shows as ⏎, and any
        other control character as an escape: a sampled NUL or carriage return made a log binary
        or overwrote the line)."""
        shown = escape("".join(_shown(ch) for ch in text))
        self._progress.console.print(
            f"[dim]sample at step {step:,}:[/] [italic]{shown}[/]", soft_wrap=True, highlight=False
        )

    def on_eval(self, record: dict[str, Any]) -> None:
        """One line per validation, kept above the bar."""
        self._progress.console.print(
            f"step {record['step']:>6,}  {record['tokens']:>11,} tok  val loss {record['val_loss']:.4f}"
            f"  ppl {record['val_ppl']:.3f}  bpc {record['val_bpc']:.4f}  lr {record['lr']:.3g}"
            f"  |grad| {record['grad_norm']:.2f} clipped {record.get('clipped_fraction', 0):.0%}"
            f"  gap {record['val_loss'] - record['train_loss']:+.3f}",
            soft_wrap=True,
            highlight=False,
        )


def eval_table(title: str, result: dict[str, Any]) -> Table:
    """The result of ``charlm eval`` as a two-column table."""
    table = Table(title=title, show_header=False)
    table.add_row("tokens", f"{result['tokens']:,}")
    table.add_row("characters", f"{result['characters']:,}")
    table.add_row("loss (nats/token)", f"{result['loss']:.4f}")
    table.add_row("perplexity (per token)", f"{result['perplexity']:.4f}")
    table.add_row("bits per character", f"{result['bpc']:.4f}")
    if "dynamic" in result:  # the same text under dynamic evaluation, next to the static figures
        dyn = result["dynamic"]
        table.add_row("dynamic: loss (nats/token)", f"{dyn['loss']:.4f}")
        table.add_row("dynamic: perplexity", f"{dyn['perplexity']:.4f}")
        table.add_row(
            "dynamic: bits per character", f"{dyn['bpc']:.4f} ({dyn['bpc'] / result['bpc'] - 1:+.1%})"
        )
    return table


def gradient_table(norms: list[float], memory: int | None, rows: int = 12, width: int = 40) -> Table:
    """The gradient norm at distance k (selected k, log-spaced), relative to k = 0, with a bar
    on a log scale: the terminal chart of ``charlm diagnose``."""
    depth = len(norms) - 1
    ks = sorted({0, depth, *(round(depth ** (i / (rows - 1))) for i in range(rows))})
    decades = 6  # the bar spans ratios 1 .. 1e-6; the effective memory (1e-3) is half a bar
    table = Table(title=f"effective memory: {memory if memory is not None else f'> {depth}'} steps")
    for column in ("k", "|grad|", "relative", f"log scale, 1 .. 1e-{decades}"):
        table.add_column(column, justify="right" if column != f"log scale, 1 .. 1e-{decades}" else "left")
    for k in ks:
        ratio = norms[k] / norms[0] if norms[0] else 0.0
        fill = 0 if ratio <= 0 else max(0, round(width * (1 + math.log10(ratio) / decades)))
        table.add_row(str(k), f"{norms[k]:.3e}", f"{ratio:.2e}", "█" * min(fill, width))
    return table


def radii_table(radii: dict[str, float]) -> Table:
    """Spectral radius of each recurrent matrix, per gate."""
    table = Table(title="spectral radius of the recurrent weights")
    table.add_column("matrix")
    table.add_column("radius", justify="right")
    for name, radius in radii.items():
        table.add_row(name, f"{radius:.3f}")
    return table


def recall_table(accuracy: dict[str, dict[int, float]], largest: dict[str, int | None]) -> Table:
    """Accuracy of each cell at each distance of the delayed-recall task, and the largest learned."""
    distances = sorted({d for points in accuracy.values() for d in points})
    table = Table(title="delayed recall: accuracy by distance (learned: >= 0.9)")
    table.add_column("cell")
    for d in distances:
        table.add_column(str(d), justify="right")
    table.add_column("largest learned", justify="right")
    for cell, points in accuracy.items():
        cells = [f"{points[d]:.2f}" if d in points else "-" for d in distances]
        table.add_row(cell, *cells, str(largest[cell]) if largest[cell] is not None else "none")
    return table


def train_summary(result: TrainResult) -> str:
    """The last line of ``charlm train``: how the run ended and where it is."""
    best = (
        f"best val bpc {result.best.bpc:.4f} (ppl {result.best.perplexity:.3f})"
        if result.best
        else "no validation yet"
    )
    skipped = f"; {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
    return (
        f"{result.stop_reason}: {result.steps} steps, {result.tokens:,} tokens in {result.elapsed:.0f}s; "
        f"{best}{skipped}; run saved in {result.run_dir}"
    )


def novelty_table(report: dict[str, Any]) -> Table:
    """``charlm novelty``: the longest copied span and the copied fraction by window size."""
    table = Table(title=f"copied from {', '.join(report['corpus'])}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("characters", f"{report['characters']:,}")
    table.add_row("longest copied span", f"{report['longest_copied']:,} characters")
    for size, fraction in report["copied_fraction"].items():
        table.add_row(f"{size}-character windows found", f"{fraction:.1%}")
    for span in report["longest_spans"][:3]:
        table.add_row("copied", escape(repr(span)))
    return table
