"""PNG plots of training curves and gradient diagnostics (matplotlib, an optional extra:
``pip install 'charlm[plot]'``). Only the plotting functions import it, so charlm runs without it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from charlm.errors import PlotError
from charlm.extras import require
from charlm.files import os_errors


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
    fraction of clipped steps) and learning rate against the step, from ``metrics.jsonl``."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    figure, ((loss, bpc), (grad, lr)) = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    loss.plot(steps, [r["train_loss"] for r in records], label="train")
    loss.plot(steps, [r["val_loss"] for r in records], label="validation")
    loss.set_ylabel("loss (nats/token)")
    loss.legend()
    bpc.plot(steps, [r["val_bpc"] for r in records], color="C1")
    bpc.set_ylabel("validation bits per character")
    grad.semilogy(steps, [r["grad_norm"] for r in records], color="C2")
    grad.set_ylabel("gradient norm before clipping")
    if any("clipped_fraction" in r for r in records):
        clipped = grad.twinx()
        clipped.plot(steps, [r.get("clipped_fraction", 0.0) for r in records], color="C3", ls="--")
        clipped.set_ylabel("fraction of steps clipped", color="C3")
        clipped.set_ylim(0, 1.05)
    lr.semilogy(steps, [r["lr"] for r in records], color="C4")
    lr.set_ylabel("learning rate")
    for axis in (grad, lr):
        axis.set_xlabel("step")
    figure.suptitle(title)
    return _save(figure, path)


def plot_gradients(curves: Mapping[str, Sequence[float]], path: Path, fall: float = 1e-3) -> Path:
    """Gradient norm at distance k relative to k = 0, log scale, one line per model."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, norms in curves.items():
        axis.semilogy(range(len(norms)), [n / norms[0] if norms[0] else 0.0 for n in norms], label=label)
    axis.axhline(fall, color="grey", ls=":", label=f"{fall:g} of k = 0 (effective memory)")
    axis.set_xlabel("k: steps back in time")
    axis.set_ylabel("|d loss(t) / d state(t - k)|, relative to k = 0")
    axis.legend()
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
