"""Gradient diagnostics: the measurement on cases with a known answer, the model report, the
delayed-recall task, and the diagnose and plot commands."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import Cell
from charlm.diagnostics.gradients import (
    diagnose_model,
    effective_memory,
    fresh_model,
    gradient_norms,
    spectral_radii,
)
from charlm.diagnostics.recall import BLANK, QUERY, SYMBOLS, recall_batch, train_recall
from tests.conftest import invoke


@given(scale=st.floats(0.5, 1.2), depth=st.integers(1, 30))
@settings(max_examples=30, deadline=None)
def test_a_linear_rnn_with_a_scaled_identity_falls_exactly_geometrically(scale: float, depth: int) -> None:
    """h_t = a h_(t-1) + x_t: d h_T / d h_(T-k) = a^k I, so the norm at k is a^k times that at 0."""

    def step(x: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = scale * state[0] + x
        return h, [h]

    weights = torch.randn(4, 6, dtype=torch.float64)
    inputs = torch.randn(depth + 5, 4, 6, dtype=torch.float64)  # (T, B, H)
    norms = gradient_norms(
        step, [torch.zeros(4, 6, dtype=torch.float64)], inputs, lambda h: (h * weights).sum(1), depth
    )
    torch.testing.assert_close(norms / norms[0], scale ** torch.arange(depth + 1, dtype=torch.float64))
    expected = math.ceil(math.log(1e-3) / math.log(scale)) if scale < 1 else None
    if expected is not None and expected > depth:
        expected = None
    assert effective_memory(norms) == expected


def test_the_report_of_a_model() -> None:
    torch.manual_seed(0)
    model = fresh_model(Cell.lstm, 2, 16, 30)
    ids = torch.randint(0, 30, (400,))
    report = diagnose_model(model, ids, depth=25, batches=2, batch_size=4)
    assert len(report.norms) == 26 and all(n > 0 for n in report.norms)
    assert report.effective_memory == effective_memory(torch.tensor(report.norms))
    assert sorted(report.spectral_radii) == sorted(
        f"layer {i} {g}" for i in range(2) for g in ("input", "forget", "cell", "output")
    )
    assert model.training  # left as it was found
    with pytest.raises(ValueError, match="needs"):
        diagnose_model(model, ids[:20], depth=25, batches=1, batch_size=1)


def test_an_irnn_starts_with_spectral_radius_one() -> None:
    radii = spectral_radii(fresh_model(Cell.irnn, 2, 8, 10))
    assert radii == pytest.approx({"layer 0 recurrent": 1.0, "layer 1 recurrent": 1.0})


def test_the_recall_task_asks_for_the_symbol_seen_distance_steps_before() -> None:
    x, y = recall_batch(7, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 5)
    assert (x[1:7] == BLANK).all() and (x[7] == QUERY).all() and (x[0] < SYMBOLS).all()
    assert torch.equal(y[7], x[0]) and (y[:7] == -100).all()


@pytest.mark.parametrize("cell", [Cell.gru, Cell.mingru])
def test_a_short_distance_is_learned(cell: Cell) -> None:
    assert train_recall(cell, 3, 150) >= 0.9
    assert train_recall(cell, 3, 0) < 0.5  # untrained: about chance


@pytest.fixture()
def run(trained_run: Path) -> Path:
    return trained_run


def test_diagnose_a_run_with_a_table_a_plot_and_json(run: Path, tmp_path: Path) -> None:
    result = invoke(
        "diagnose", run, "--depth", "20", "--batches", "1", "--batch-size", "4", "--plot", tmp_path / "g.png"
    )
    assert result.exit_code == 0, result.output
    # the default cell (minGRU) has no recurrent matrix: its gradient through time is its decays'
    assert "effective memory" in result.stdout and "spectral radius" not in result.stdout
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("diagnose", run, "--depth", "20", "--batches", "1", "--batch-size", "4", "--json")
    report = json.loads(result.stdout)
    assert len(report["norms"]) == 21 and report["spectral_radii"] == {}
    result = invoke("diagnose", "--cell", "lstm", "--layers", "1", "--hidden", "16", "--depth", "10")
    assert "spectral radius" in result.stdout and "layer 0 forget" in result.stdout


def test_diagnose_a_fresh_model_and_the_task(tmp_path: Path) -> None:
    result = invoke("diagnose", "--cell", "gru", "--layers", "1", "--hidden", "16", "--depth", "10", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "fresh gru 1x16"
    result = invoke(
        "diagnose", "--task", "--cells", "rnn,lstm", "--distances", "2,3", "--task-steps", "20", "--json",
        "--plot", tmp_path / "task.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)["results"]
    assert [r["cell"] for r in results] == ["rnn", "lstm"] and set(results[0]["accuracy"]) == {"2", "3"}
    assert (tmp_path / "task.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--depth", "100000"], "needs"),
        (["--task", "--cells", "cnn"], "cnn"),
        (["--task", "--distances", "0"], "at least 1"),
    ],
)
def test_diagnose_mistakes_are_one_line(run: Path, args: list[str], message: str) -> None:
    result = invoke("diagnose", run, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_plot_draws_the_training_curves(run: Path, tmp_path: Path) -> None:
    result = invoke("plot", run, "--out", tmp_path / "t.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["clipped_fraction"] <= 1 for r in records)


def test_the_plots_draw_awkward_inputs(tmp_path: Path) -> None:
    """One validation, records from before the clipped fraction was written, a gradient that is
    zero at k = 0 or falls below the chart's floor, and one measured at k = 0 only: each draws."""
    from charlm.diagnostics.plots import plot_gradients, plot_training

    record = {"step": 10, "train_loss": 2.0, "val_loss": 1.9, "val_bpc": 2.7, "grad_norm": 0.5, "lr": 3e-3}
    for records in ([record], [record, {**record, "step": 20, "grad_norm": 50.0, "clipped_fraction": 0.5}]):
        assert plot_training(records, tmp_path / "t.png", "run").read_bytes()[:4] == b"\x89PNG"
    curves = {"zero": [0.0, 0.0], "falls": [1.0, 1e-20, 1e-40], "one": [2.0]}
    assert plot_gradients(curves, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_get_it(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module set to None in sys.modules is one Python cannot import, and the one that
    charlm.extras.require's look-up sees (patching __import__ would hide it from the import only)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("plot", run)
    assert result.exit_code == 1 and "pip install 'charlm[plot]'" in result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
