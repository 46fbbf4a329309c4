"""PNG plots of training curves and gradient diagnostics (matplotlib, an optional extra:
``pip install 'charlm[plot]'``). Only the plotting functions import it, so charlm runs without it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from charlm.errors import PlotError
from charlm.extras import require
from charlm.files import os_errors

FLOOR = 1e-12  # the gradient plot's lowest relative norm: below it, nothing reaches back


def _pyplot() -> Any:
    require("plot", "a plot")
    import matplotlib

    matplotlib.use("Agg")  # files only: no screen needed
    from matplotlib import pyplot

    return pyplot


def _save(figure: Any, path: Path) -> Path:
    try:
        with os_errors(PlotError, f"cannot write {path}"):
            figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        figure.clear()
    return path


def plot_training(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Loss (train and validation), bits per character, gradient norm before clipping (with the
    fraction of clipped steps) and learning rate against the step, from ``metrics.jsonl``.

    Each panel says what it shows in its title, so the y axes carry units only and nothing collides;
    the layout is matplotlib's constrained one, which makes room for the twin axis of the clipped
    fraction."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    figure, ((loss, bpc), (grad, lr)) = plt.subplots(2, 2, figsize=(11, 7), sharex=True, layout="constrained")
    loss.plot(steps, [r["train_loss"] for r in records], label="train")
    loss.plot(steps, [r["val_loss"] for r in records], label="validation")
    loss.set(title="loss", ylabel="nats per token")
    loss.legend()
    bpc.plot(steps, [r["val_bpc"] for r in records], color="C1")
    bpc.set(title="validation bits per character", ylabel="bits per character")
    norms = [r["grad_norm"] for r in records]
    lines = grad.plot(steps, norms, color="C2", label="gradient norm")
    if _spans_decades(norms):  # a norm that explodes or vanishes; a narrow range reads better linear
        grad.set_yscale("log")
    grad.set(title="gradient norm before clipping", ylabel="L2 norm")
    if any("clipped_fraction" in r for r in records):
        clipped = grad.twinx()
        fraction = [r.get("clipped_fraction", 0.0) for r in records]
        lines += clipped.plot(steps, fraction, color="C3", ls="--", label="steps clipped (right)")
        clipped.set_ylabel("fraction of steps clipped", color="C3")
        clipped.tick_params(axis="y", colors="C3")
        clipped.set_ylim(-0.03, 1.05)  # a fraction of 0 shows above the axis line, not on it
    grad.legend(handles=lines, loc="upper right")
    lr.plot(steps, [r["lr"] for r in records], color="C4")  # linear: the schedule's shape shows
    lr.set_title("learning rate")
    lr.yaxis.set_major_formatter(lambda value, _: f"{value:g}")  # 0.003, not an offset "1e-3" by the title
    for axis in (grad, lr):
        axis.set_xlabel("step")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _spans_decades(values: Sequence[float]) -> bool:
    """Whether positive ``values`` span more than a factor of 10 (then a log axis reads better)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > 10 * min(positive)


def plot_gradients(curves: Mapping[str, Sequence[float]], path: Path, fall: float = 1e-3) -> Path:
    """Gradient norm at distance k relative to k = 0, log scale, one line per model.

    The axis stops at ``FLOOR`` of k = 0: a gradient that small carries nothing back, and a plain
    RNN's fall to 1e-30 would otherwise squeeze the cells that keep theirs into the top of the
    chart (its line leaves through the bottom). The legend sits under the chart, off the lines."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5), layout="constrained")
    lowest, longest = 1.0, max((len(norms) for norms in curves.values()), default=1)
    for label, norms in curves.items():
        relative = [n / norms[0] if norms[0] else 0.0 for n in norms]
        axis.semilogy(range(len(norms)), relative, label=label)
        lowest = min([lowest, *(r for r in relative if r > 0)])
    axis.axhline(fall, color="grey", ls=":", label=f"{fall:g} of k = 0 (effective memory)")
    axis.set_ylim(bottom=max(lowest, FLOOR) / 2, top=2.0)
    axis.set_xlim(0, max(longest - 1, 1))
    axis.set_xlabel("k: steps back in time")
    axis.set_ylabel("|d loss(t) / d state(t - k)|, relative to k = 0")
    axis.grid(True, which="major", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2 if len(curves) > 2 else 1, frameon=False)
    return _save(figure, path)


def plot_recall(accuracy: Mapping[str, Mapping[int, float]], path: Path, chance: float) -> Path:
    """Accuracy of the delayed-recall task against the distance, one line per cell."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for cell, points in accuracy.items():
        axis.semilogx(list(points), list(points.values()), marker="o", label=cell)
    axis.axhline(chance, color="grey", ls=":", label="chance")
    axis.set_xlabel("distance (steps between the symbol and its recall)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.05)
    axis.legend()
    return _save(figure, path)
