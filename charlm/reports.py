"""The figures the commands print, as plain data: the score of ``charlm eval``, the gradient and
delayed-recall measurements of ``charlm diagnose``, the copy check of ``charlm novelty`` and the
curves of ``charlm plot``. The command line renders each dict as a table or writes it as its JSON
object (``--json``), so a Python caller gets what the command writes, number for number.

    import charlm
    from charlm.reports import eval_report
    eval_report(charlm.load("checkpoints/x"))  # == json.loads(`charlm eval checkpoints/x --json`)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from charlm.config import DYNAMIC_DECAY, DYNAMIC_LR, Cell, ModelConfig, Precision, TokenizerConfig
from charlm.data.corpus import expand_inputs, text_chunks
from charlm.data.prepare import builtin_corpus, read_corpus
from charlm.data.tokenizer import Tokenizer, train_tokenizer
from charlm.device import resolve_device
from charlm.diagnostics import gradients, recall
from charlm.diagnostics.novelty import novelty
from charlm.errors import CheckpointError, ConfigError, CorpusError
from charlm.model.network import RNNLM
from charlm.runs import rundir

if TYPE_CHECKING:
    from charlm.api import Model

PathLike = str | os.PathLike[str]
FRESH_TEXT = 200_000  # characters of the built-in corpus a fresh model is measured on


def eval_report(
    model: Model,
    data: Sequence[PathLike] | None = None,
    encoding: str = "utf-8",
    precision: Precision | str | None = None,
    dynamic: bool = False,
    dynamic_lr: float = DYNAMIC_LR,
    dynamic_decay: float = DYNAMIC_DECAY,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """``charlm eval``: the model's score on ``data`` (files, directories or glob patterns read as
    one text), else on the run's held-out split: ``tokens``, ``characters``, ``loss``,
    ``perplexity``, ``bpc``, the ``precision`` it was scored in, the ``run`` and the ``data``; with
    ``dynamic``, also ``dynamic``: the same figures under dynamic evaluation, with its ``lr`` and
    ``decay`` (``progress`` is called with (tokens done, tokens) while it runs).

    Raises:
        CorpusError: ``data`` cannot be read. ConfigError: an empty text, or dynamic settings out
        of range.
    """
    text = read_corpus(list(data), encoding) if data else model.run.heldout_text()
    report: dict[str, Any] = model.evaluate(text, precision).to_dict()
    report["precision"] = model.precision(precision)
    report["run"] = str(model.path)
    report["data"] = ", ".join(map(str, data)) if data else "held-out split"
    if dynamic:
        adapted = model.evaluate(
            text, precision, dynamic=True, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
            progress=progress,
        )  # fmt: skip
        report["dynamic"] = {**adapted.to_dict(), "lr": dynamic_lr, "decay": dynamic_decay}
    return report


def gradient_report(
    model: Model,
    data: Sequence[PathLike] | None = None,
    depth: int = 200,
    batches: int = 4,
    batch_size: int = 16,
    plot: PathLike | None = None,
    encoding: str = "utf-8",
) -> dict[str, Any]:
    """``charlm diagnose RUN``: how far back the loss's gradient reaches in a trained model, on
    ``data`` (else the run's held-out split), named by the run's path. See
    :func:`fresh_gradient_report` for the fields."""
    text = read_corpus(list(data), encoding) if data else model.run.heldout_text()
    return _measure(
        model.network, model.run.tokenizer, text, str(model.path), depth, batches, batch_size, plot
    )


def fresh_gradient_report(
    cell: Cell | str,
    layers: int | None = None,
    hidden: int | None = None,
    forget_bias: float = ModelConfig.forget_bias,
    residual: bool = False,
    data: Sequence[PathLike] | None = None,
    depth: int = 200,
    batches: int = 4,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    plot: PathLike | None = None,
    encoding: str = "utf-8",
) -> dict[str, Any]:
    """``charlm diagnose --cell CELL``: the same measurement on a freshly initialised model (seeded
    by ``seed``, with the cell's default ``layers`` and ``hidden`` where None), over a character
    tokenizer of ``data`` (else 200,000 characters of the built-in corpus).

    Returns:
        ``model`` (a name), ``norms`` (|d loss(t) / d state(t-k)| for k = 0..``depth``, averaged over
        ``batches`` x ``batch_size`` positions), ``effective_memory`` (the first k where the norm
        falls below 1/1000 of k = 0; None: beyond ``depth``) and ``spectral_radii`` (each recurrent
        matrix's, per gate; none for a scan cell). With ``plot``, the curve is also drawn there.

    Raises:
        ConfigError: the text is too short for ``depth``. MissingExtraError: ``plot`` without
        matplotlib.
    """
    cell = Cell(cell)
    torch.manual_seed(seed)
    text = read_corpus(list(data), encoding) if data else builtin_corpus()[:FRESH_TEXT]
    tokenizer = train_tokenizer(text, TokenizerConfig())
    # layers, hidden None: the cell's defaults, as ModelConfig resolves them
    network = gradients.fresh_model(
        cell, layers, hidden, tokenizer.vocab_size, forget_bias=forget_bias, residual=residual
    )  # type: ignore[arg-type]
    network = network.to(resolve_device(device))
    name = f"fresh {cell.value} {network.config.layers}x{network.config.hidden}"
    return _measure(network, tokenizer, text, name, depth, batches, batch_size, plot)


def _measure(
    network: RNNLM,
    tokenizer: Tokenizer,
    text: str,
    name: str,
    depth: int,
    batches: int,
    batch_size: int,
    plot: PathLike | None,
) -> dict[str, Any]:
    """The gradient report of ``network`` on ``text``, named ``name`` (and its plot)."""
    ids = torch.from_numpy(tokenizer.encode_array(text))  # (N,)
    try:
        measured = gradients.diagnose_model(network, ids, depth, batches, batch_size)
    except ValueError as exc:  # the text is too short for the depth
        raise ConfigError(str(exc)) from exc
    if plot is not None:
        from charlm.diagnostics.plots import plot_gradients

        plot_gradients({name: measured.norms}, Path(plot))
    return {"model": name, **dataclasses.asdict(measured)}


def recall_report(
    cells: Sequence[Cell | str],
    distances: Sequence[int],
    steps: int = 1000,
    forget_bias: float = ModelConfig.forget_bias,
    seed: int = 0,
    plot: PathLike | None = None,
    on_result: Callable[[Cell, int, float], None] | None = None,
) -> dict[str, Any]:
    """``charlm diagnose --task``: the delayed-recall task. Each cell is trained ``steps`` steps to
    recall a symbol seen each distance before (shortest first; a cell stops after two failures in a
    row), and ``on_result`` hears each (cell, distance, accuracy) as it is known.

    Returns:
        ``task``, ``steps`` and ``results``: per cell, its ``accuracy`` by distance and the
        ``largest`` distance learned (accuracy >= 0.9; None: not even the shortest). With ``plot``,
        the accuracies are also drawn there.

    Raises:
        ConfigError: no cells or distances, a distance or ``steps`` below 1.
    """
    chosen = [Cell(c) for c in cells]
    if not chosen or not distances or min(distances) < 1 or steps < 1:
        raise ConfigError("the recall task needs cells, distances of at least 1 and steps of at least 1")
    results = recall.recall_table(
        chosen, list(distances), steps, seed=seed, forget_bias=forget_bias,
        on_result=on_result or (lambda cell, distance, accuracy: None),
    )  # fmt: skip
    if plot is not None:
        from charlm.diagnostics.plots import plot_recall

        plot_recall({r.cell: r.accuracy for r in results}, Path(plot), 1 / recall.SYMBOLS)
    return {"task": "delayed recall", "steps": steps, "results": [dataclasses.asdict(r) for r in results]}


def novelty_report(
    text: str | Callable[[], str],
    run: PathLike | None = None,
    corpus: Sequence[PathLike] | None = None,
    encoding: str = "utf-8",
) -> dict[str, Any]:
    """``charlm novelty``: how much of ``text`` is copied verbatim from the run's training corpus
    (or ``corpus``), read as a stream in bounded memory. ``text`` may be a function that returns
    it, called once the corpus is known (a face reading stdin then fails before waiting on it).

    Returns:
        ``characters``, ``longest_copied`` (characters), ``copied_fraction`` (by window size, as a
        string key), ``longest_spans`` and ``corpus`` (the sources compared with).

    Raises:
        CheckpointError: no such run. CorpusError: no corpus recorded or given, or it cannot be read.
    """
    loaded = rundir.load_run(Path(run) if run is not None else rundir.latest_run())
    sources = [Path(p) for p in corpus] if corpus else [Path(p) for p in loaded.config.corpus]
    if not sources:
        raise CorpusError(
            f"{loaded.path} does not record its corpus; give it with {{corpus}}", fields=("corpus",)
        )
    sample = text() if callable(text) else text
    paths = expand_inputs(sources)
    result = novelty(sample, lambda: text_chunks(paths, encoding))  # streamed: bounded memory
    return {
        "characters": result.characters, "longest_copied": result.longest_copied,
        "copied_fraction": {str(k): v for k, v in result.copied_fraction.items()},
        "longest_spans": result.longest_spans, "corpus": [str(s) for s in sources],
    }  # fmt: skip


def training_plot(run: PathLike | None = None, out: PathLike | None = None) -> Path:
    """``charlm plot``: draw a run's (default: the latest) training and validation loss, bits per
    character, gradient norm and clipped fraction, and learning rate to a PNG (default:
    RUN/training.png); returns its path.

    Raises:
        CheckpointError: no such run, or no validation yet. MissingExtraError: no matplotlib.
    """
    from charlm.diagnostics.plots import plot_training

    loaded = rundir.load_run(Path(run) if run is not None else rundir.latest_run())
    records = rundir.read_metrics(loaded.path)
    if not records:
        raise CheckpointError(f"{loaded.path} has no validation yet: nothing to plot")
    path = Path(out) if out is not None else loaded.path / "training.png"
    return plot_training(records, path, str(loaded.path))
