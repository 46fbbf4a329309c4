"""The scan cells (minGRU, minLSTM): the parallel scan computes the recurrence it stands for, the
window-by-window forward equals the token-by-token step that sampling uses, and a run of the
default cell trains, samples, keeps a small state file and scores through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import Activation, Cell, ModelConfig
from charlm.errors import ConfigError
from charlm.model.network import RNNLM, detach_hidden
from charlm.model.scan import CHUNK, LOG_A_MIN, linear_scan
from charlm.model.stepper import Stepper
from tests.conftest import invoke

SCAN_CELLS = [Cell.mingru, Cell.minlstm]


def recurrence(log_a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t, one step after the other."""
    out = []
    for t in range(b.size(0)):
        h = torch.exp(log_a[t].clamp(min=LOG_A_MIN)) * h + b[t]
        out.append(h)
    return torch.stack(out)


@given(
    steps=st.integers(1, 3 * CHUNK + 5), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 2.0, 20.0])
)
@settings(max_examples=40, deadline=None)
def test_the_parallel_scan_is_the_recurrence(steps: int, seed: int, scale: float) -> None:
    """Any length (within a chunk, across chunk boundaries), decays from none to past the clamp."""
    g = torch.Generator().manual_seed(seed)
    log_a = -torch.rand(steps, 3, 5, generator=g) * scale  # (T, B, D)
    b, h0 = torch.randn(steps, 3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(linear_scan(log_a, b, h0), recurrence(log_a, b, h0), rtol=1e-5, atol=1e-5)


def test_the_scan_is_exact_float32_under_bf16_autocast() -> None:
    """Autocast must not reach the scan's own sums (on a CPU, products with a matrix of ones)."""
    g = torch.Generator().manual_seed(0)
    log_a = -torch.rand(2 * CHUNK + 3, 2, 4, generator=g) * 5  # (T, B, D)
    b, h0 = torch.randn(2 * CHUNK + 3, 2, 4, generator=g), torch.randn(2, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear_scan(log_a, b, h0)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, recurrence(log_a, b, h0), rtol=1e-5, atol=1e-5)


def tiny(cell: Cell, layers: int = 2, hidden: int = 16, mlp: Activation = Activation.relu2) -> RNNLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=23, cell=cell, layers=layers, hidden=hidden, dropout=0.0, mlp=mlp)
    return RNNLM(config).eval()


MLPS = [(c, Activation.relu2) for c in SCAN_CELLS] + [(Cell.mingru, Activation.gelu)]


@pytest.mark.parametrize("cell,mlp", MLPS)
@pytest.mark.parametrize("windows", [(7, 16, 25), (1, 40, 3, 1)])
@pytest.mark.parametrize("streams", [1, 2])
@torch.no_grad()
def test_windows_with_carried_state_equal_the_token_by_token_step(
    cell: Cell, mlp: Activation, windows: tuple[int, ...], streams: int
) -> None:
    """The scan over several windows, the state (recurrence and convolution inputs) carried from
    one to the next, gives the outputs and final state of the NumPy step sampling uses (1e-5),
    with either MLP (GELU: runs written before the squared ReLU), for one stream (its own vector
    path) and for several."""
    model = tiny(cell, mlp=mlp)
    tokens = torch.randint(0, 23, (sum(windows), streams), generator=torch.Generator().manual_seed(3))
    scores, hidden, start = [], None, 0
    for length in windows:
        out, hidden = model(tokens[start : start + length], hidden)  # (w, B, V)
        scores.append(out)
        hidden = detach_hidden(hidden)
        start += length
    stepper = Stepper(model)
    assert stepper.full  # so one stream takes the vector path
    state, stepped = stepper.zero_state(streams), []
    for t in range(tokens.size(0)):
        logits, state = stepper.step(tokens[t].numpy(), state)
        stepped.append(logits)
    np.testing.assert_allclose(np.stack(stepped), torch.cat(scores).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(state), hidden.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", SCAN_CELLS)
def test_bf16_autocast_trains_with_the_scan_in_float32(cell: Cell) -> None:
    model = tiny(cell).train()
    tokens = torch.randint(0, 23, (40, 4), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, hidden = model(tokens[:-1], None, tokens[1:])
    loss.backward()
    assert torch.isfinite(loss) and hidden.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32, _ = model.eval()(tokens[:-1], None, tokens[1:])
    assert abs(loss.item() - fp32.item()) < 0.05


def test_the_gradient_through_time_is_the_product_of_the_decays() -> None:
    """No repeated matrix: d h_T / d h_0 of one channel is the product of its decays."""
    log_a = -torch.rand(30, 1, 4)
    h0 = torch.randn(1, 4, requires_grad=True)
    linear_scan(log_a, torch.randn(30, 1, 4), h0)[-1].sum().backward()
    torch.testing.assert_close(h0.grad, torch.exp(log_a.sum(0)), rtol=1e-5, atol=1e-7)


def test_a_scan_cell_embeds_in_its_width() -> None:
    assert ModelConfig(cell=Cell.mingru, hidden=64).embed == 64
    with pytest.raises(ConfigError, match="embed must equal hidden"):
        ModelConfig(cell=Cell.mingru, hidden=64, embed=32)


def test_each_cell_has_its_own_default_shape() -> None:
    """The classic cells keep the shape they always had; the scan cells are small and deep."""
    lstm = ModelConfig(cell=Cell.lstm)
    assert (lstm.layers, lstm.hidden, lstm.embed, lstm.dropout) == (2, 512, 512, 0.1)
    assert ModelConfig().cell is Cell.mingru
    assert ModelConfig(cell=Cell.lstm, hidden=64).embed == 512
    assert ModelConfig().mlp is Activation.relu2


@pytest.mark.parametrize("cell", SCAN_CELLS)
def test_a_scan_run_trains_samples_and_keeps_a_small_state(tmp_path: Path, corpus: Path, cell: Cell) -> None:
    out = tmp_path / "run"
    args = ["--hidden", "32", "--layers", "2", "--batch-size", "8", "--bptt", "32", "--device", "cpu"]
    result = invoke(
        "train", corpus, "--out", out, "--cell", cell.value, "--max-steps", "30", "--eval-every", "10", *args
    )
    assert result.exit_code == 0, result.output
    state = tmp_path / "s"
    sampled = invoke("sample", out, "--prime", "The ", "--length", "40", "--seed", "2", "--save-state", state)
    assert sampled.exit_code == 0, sampled.output
    again = invoke("sample", out, "--prime", "The ", "--length", "40", "--seed", "2")
    assert sampled.stdout == again.stdout and len(sampled.stdout) > 10
    assert state.stat().st_size < 8_000  # 2 layers x 4 x 32 floats, the logits, the metadata
    scored = invoke("eval", out, "--perplexity")
    assert scored.exit_code == 0 and "bits per character" in scored.stdout


def test_a_scan_run_is_regularised_by_its_passes_and_says_why(
    tmp_path: Path, corpus: Path, corpus_text: str
) -> None:
    import json

    from charlm.config import WEIGHT_DECAY_BY_PASSES, weight_decay_for

    def logged(run: Path) -> list[float]:
        return [json.loads(line)["weight_decay"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    small = ["--hidden", "16", "--layers", "1"]
    args = [*small, "--batch-size", "4", "--bptt", "16", "--max-steps", "2"]
    result = invoke("train", corpus, "--out", tmp_path / "a", *args)
    assert result.exit_code == 0, result.output
    assert "weight decay follows the passes this run makes" in result.output
    saved = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert (saved["model"]["dropout"], saved["train"]["weight_decay"]) == (0.0, None)  # set as it goes
    # 2 steps of 4 x 16 tokens read a fraction of this corpus: 0.1, said up front
    assert "this run: 0.0" in result.output and "weight decay 0.1)" in result.output
    assert logged(tmp_path / "a") == [pytest.approx(0.1)]
    refused = invoke("train", corpus, "--out", tmp_path / "a", "--resume", "--weight-decay", "0.3", *args)
    assert refused.exit_code != 0 and "weight-decay is by the passes in this run; 0.3 given" in refused.output
    # three epochs: between the rule's points, in what the run logged and in the optimizer it saved
    result = invoke("train", corpus, "--out", tmp_path / "e", "--epochs", "3", *small, "--bptt", "128")
    assert result.exit_code == 0, result.output
    assert "this run: 3 passes, weight decay 0.118" in result.output
    three = pytest.approx(weight_decay_for(3.0))
    assert logged(tmp_path / "e") == [three] * 3  # a validation at each epoch's end
    state = json.loads((tmp_path / "e" / "latest" / "state.json").read_text())
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [three]
    # a time budget foresees its passes from its speed: 300 characters are read dozens
    # of times in three seconds, so the last steps are at the rule's highest
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(corpus_text[:300], encoding="utf-8")
    timed = [*small, "--batch-size", "2", "--bptt", "16", "--max-time", "3s", "--eval-every", "100000"]
    result = invoke("train", tiny, "--out", tmp_path / "t", *timed)
    assert result.exit_code == 0, result.output
    assert "foreseen from its speed as it goes" in result.output
    assert logged(tmp_path / "t")[-1] == pytest.approx(WEIGHT_DECAY_BY_PASSES[-1][1])
    # what the user sets stays theirs; the classic cells keep their defaults
    result = invoke("train", corpus, "--out", tmp_path / "b", "--weight-decay", "0.05", *args)
    assert "weight decay follows" not in result.output
    saved = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert saved["train"]["weight_decay"] == 0.05
    result = invoke("train", corpus, "--out", tmp_path / "c", "--cell", "lstm", *args)
    assert "weight decay follows" not in result.output


@given(st.floats(0, 1000), st.floats(0, 1000))
def test_weight_decay_rises_with_the_passes_between_its_ends(a: float, b: float) -> None:
    from charlm.config import WEIGHT_DECAY_BY_PASSES, weight_decay_for

    low, high = sorted((a, b))
    assert 0.1 <= weight_decay_for(low) <= weight_decay_for(high) <= 0.6
    for passes, decay in WEIGHT_DECAY_BY_PASSES:  # through its points
        assert weight_decay_for(passes) == pytest.approx(decay)
    assert weight_decay_for(12**0.5) == pytest.approx(0.125)  # log-linear: halfway between 2 and 6


def test_a_run_knows_its_passes_from_its_steps_or_foresees_them_from_its_time() -> None:
    from charlm.config import TrainConfig
    from charlm.training.schedule import Clock

    assert Clock(TrainConfig(max_steps=50), steps_per_epoch=10).passes(0) == 5.0
    assert Clock(TrainConfig(epochs=3), steps_per_epoch=10).passes(7) == 3.0
    timed = Clock(TrainConfig(max_time=60.0), steps_per_epoch=10)
    assert timed.passes(0, elapsed=0.0) == 0.0  # nothing to go by yet
    assert timed.passes(30, elapsed=20.0) == pytest.approx(9.0)  # 3 passes in a third of the time
    # a step count that ends the run first: the smaller
    both = Clock(TrainConfig(max_time=60.0, max_steps=40), steps_per_epoch=10)
    assert both.passes(30, elapsed=20.0) == pytest.approx(4.0)


def test_a_timed_run_has_no_epoch_limit_unless_given() -> None:
    from charlm.config import TrainConfig
    from charlm.training.schedule import Clock

    assert TrainConfig().epoch_limit == 10
    assert TrainConfig(max_time=60.0).epoch_limit is None
    assert TrainConfig(max_time=60.0, epochs=3).epoch_limit == 3
    clock = Clock(TrainConfig(max_time=60.0), steps_per_epoch=10)
    assert clock.total_steps is None and clock.fraction(10_000, elapsed=30.0) == 0.5


def test_options_a_scan_cell_has_no_use_for_are_refused() -> None:
    for option in ({"weight_drop": 0.2}, {"residual": True}):
        with pytest.raises(ConfigError, match="no recurrent matrix"):
            ModelConfig(cell=Cell.mingru, **option)


def test_sgd_gets_no_weight_decay_from_the_passes_rule() -> None:
    """SGD's weight decay is L2 at lr 20: the rule's 0.3 would blow the weights up."""
    from charlm.config import OptimizerKind, RunConfig, TokenizerConfig, TrainConfig, fit_to_corpus

    config = RunConfig(
        tokenizer=TokenizerConfig(), model=ModelConfig(), train=TrainConfig(optimizer=OptimizerKind.sgd)
    )
    fitted, why = fit_to_corpus(config, 1000, given=())
    assert fitted.train.weight_decay == 0.0 and why is None  # nothing chosen, nothing said
    with pytest.raises(ConfigError, match="is for adam"):
        TrainConfig(optimizer=OptimizerKind.sgd, weight_decay=None)


def test_a_new_scan_run_has_the_squared_relu_unless_asked_for_gelu(tmp_path: Path, corpus: Path) -> None:
    """New runs record ``mlp: relu2``; ``--mlp gelu`` (``mlp="gelu"`` in Python) trains the GELU of
    earlier runs, and a resume may not change it."""
    import charlm

    charlm.train(corpus, out=tmp_path / "new", hidden=16, layers=1, batch_size=4, bptt=16, max_steps=2)
    assert charlm.load(tmp_path / "new").run.config.model.mlp is Activation.relu2
    args = ["--hidden", "16", "--layers", "1", "--batch-size", "4", "--bptt", "16", "--max-steps", "2"]
    assert invoke("train", corpus, "--out", tmp_path / "gelu", "--mlp", "gelu", *args).exit_code == 0
    gelu = charlm.load(tmp_path / "gelu")
    assert gelu.run.config.model.mlp is Activation.gelu and gelu.network.rnn.blocks[0].mlp == "gelu"
    refused = invoke("train", corpus, "--out", tmp_path / "gelu", "--resume", "--mlp", "relu2", *args)
    assert refused.exit_code != 0 and "--mlp" in refused.output and "Traceback" not in refused.output
