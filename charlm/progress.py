"""Rich rendering of training progress and results, on stderr (stdout is for sampled text and
JSON). Implements :class:`charlm.train.Callbacks`."""

from __future__ import annotations

import math
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

if TYPE_CHECKING:
    from charlm.train import StepReport

LN2 = math.log(2)


class _TwoLineProgress(Progress):
    """A progress bar with the training figures on a second line, so it fits 80 columns."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        self.figures = Text()  # set first: the base class renders while it initialises
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self.figures


class TrainProgress:
    """A live progress bar for ``charlm train`` plus a line per validation.

    Args:
        console: where to draw (a stderr console in the CLI).
        chars_per_token: to turn a training loss per token into bits per character.
    """

    def __init__(self, console: Console, chars_per_token: float = 1.0) -> None:
        self.console = console
        self.chars_per_token = chars_per_token
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
        """A phase of the run (tokenizer, encoding, model size)."""
        self._progress.console.print(f"[dim]{escape(message)}[/]", soft_wrap=True, highlight=False)

    def on_progress(self, task: str, done: int, total: int) -> None:
        """A bar for a long pass over the corpus (reading, encoding), gone when it is done."""
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
        """Update the bar from a :class:`charlm.train.StepReport`."""
        self._progress.start()  # a no-op once started
        self._progress.start_task(self._task)
        self._progress.update(
            self._task, completed=report.fraction, epoch=f"{report.epoch}/{report.epochs}", step=report.step
        )
        self._progress.figures = Text(
            f"loss {report.loss:.3f}  ppl {math.exp(min(report.loss, 700)):.2f}  "
            f"bpc {report.loss / LN2 / self.chars_per_token:.3f}  lr {report.lr:.3g}  "
            f"|grad| {report.grad_norm:.2f}  {report.tokens_per_sec:,.0f} tok/s",
            style="cyan",
        )

    def on_eval(self, record: dict[str, Any]) -> None:
        """One line per validation, kept above the bar."""
        self._progress.console.print(
            f"step {record['step']:>6,}  {record['tokens']:>11,} tok  val loss {record['val_loss']:.4f}"
            f"  ppl {record['val_ppl']:.3f}  bpc {record['val_bpc']:.4f}  lr {record['lr']:.3g}",
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
    return table
