"""Regularisation that suits recurrent models, dynamic evaluation, and the memorisation warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.cli.options import worded
from charlm.config import Cell, ModelConfig, RunConfig, TokenizerConfig
from charlm.model.network import RNNLM
from charlm.model.scoring import dynamic_nats, evaluate, total_nats
from charlm.runs import rundir
from charlm.training.loop import OVERFIT_PATIENCE
from tests.conftest import TINY_MODEL, invoke


@pytest.mark.parametrize("cell", list(Cell))
@pytest.mark.parametrize("residual", [False, True])
def test_layer_by_layer_training_path_equals_the_fused_module_without_dropout(
    cell: Cell, residual: bool
) -> None:
    if cell.scan and residual:
        pytest.skip("a scan cell's layers are residual blocks already (--residual is refused)")
    torch.manual_seed(0)
    model = RNNLM(
        ModelConfig(
            vocab_size=11,
            hidden=12,
            embed=12 if cell.scan else 8,
            layers=3,
            cell=cell,
            dropout=0.0,
            residual=residual,
        )
    )
    x = torch.randint(0, 11, (9, 4))
    model.train()
    trained, hidden_t = model(x)
    model.eval()
    inferred, hidden_e = model(x)
    assert torch.allclose(trained, inferred, atol=1e-5)
    for a, b in zip(hidden_t if isinstance(hidden_t, tuple) else (hidden_t,),
                    hidden_e if isinstance(hidden_e, tuple) else (hidden_e,), strict=True):  # fmt: skip
        assert torch.allclose(a, b, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(p=st.floats(0.1, 0.9), seed=st.integers(0, 1000))
def test_locked_dropout_mask_is_the_same_at_every_time_step(p: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = RNNLM(ModelConfig(vocab_size=5, hidden=4, embed=4, dropout=p))
    x = torch.ones(7, 3, 16)
    dropped = model.drop(x)  # (T, B, D)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # one mask per stream, all steps
    kept = dropped[dropped != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    model.eval()
    assert torch.equal(model.drop(x), x)


def test_weight_drop_masks_recurrent_weights_in_training_only() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=7, cell=Cell.lstm, hidden=16, embed=8, layers=1, dropout=0.0, weight_drop=0.5
    )
    model = RNNLM(config)
    x = torch.randint(0, 7, (6, 2))
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert not torch.allclose(a, b)  # a new DropConnect mask each call
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    # the mask falls on the recurrent matrix only: a zero state sees no difference at step one
    model.train()
    first = [model(x[:1])[0] for _ in range(3)]
    assert all(torch.allclose(first[0], f) for f in first)


def test_old_configs_load_without_weight_drop() -> None:
    data = RunConfig(tokenizer=TokenizerConfig(), model=ModelConfig()).to_dict()
    del data["model"]["weight_drop"], data["train"]["weight_decay"]
    config = RunConfig.from_dict(data)
    assert config.model.weight_drop == 0.0 and config.train.weight_decay == 0.0


def test_dynamic_evaluation_adapts_to_a_repeated_text_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=9, cell=Cell.lstm, hidden=32, embed=16, layers=1, dropout=0.3))
    ids = torch.randint(1, 9, (8,)).repeat(64)  # a text that repeats itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    static = total_nats(model, ids, 0).item()
    dynamic = dynamic_nats(model, ids, 0, lr=1.0).item()
    assert dynamic < 0.95 * static  # it learned the repeats as it read them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # with a zero learning rate it is the static score of one stream read in order
    frozen = dynamic_nats(model, ids, 0, lr=1e-12).item()
    assert frozen == pytest.approx(
        evaluate(model, ids, ids.numel(), 0, streams=1).loss * ids.numel(), rel=1e-4
    )


def test_eval_dynamic_cli_reports_both_figures_and_keeps_the_run(trained_run: Path, corpus: Path) -> None:
    weights = (trained_run / "best" / "model.safetensors").read_bytes()
    result = invoke("eval", trained_run, "--data", corpus, "--dynamic", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"bpc", "dynamic"} <= set(report) and report["dynamic"]["tokens"] == report["tokens"]
    assert report["dynamic"]["bpc"] < report["bpc"]
    assert (trained_run / "best" / "model.safetensors").read_bytes() == weights
    table = invoke("eval", trained_run, "--data", corpus, "--dynamic")
    assert "dynamic: bits per character" in table.stdout


def test_memorisation_warning_comes_once(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out losses that stall while the training loss falls: one warning, with a remedy."""
    from charlm.training import loop as module
    from tests.test_train import config

    scripted = iter([3.0, 2.0] + [2.1] * 20)

    def stalled(model: object, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(next(scripted) * ids.numel(), dtype=torch.float64)

    monkeypatch.setattr(module, "total_nats", stalled)
    messages: list[str] = []

    class Record(module.SilentCallbacks):
        def on_status(self, message: str) -> None:
            messages.append(message)

    cfg = config(max_steps=100, eval_every=10, decay=0.0, anneal=1.0, lr=0.01)
    run, train_ids, val_ids = module.prepare_run([corpus], cfg, tmp_path / "run")
    module.fit(run, train_ids, val_ids, Record())
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1, messages
    assert f"not improved for {OVERFIT_PATIENCE} validations" in warnings[0]
    # the library names its fields, the command line its options
    assert "raise dropout or weight_decay" in warnings[0]
    assert "raise --dropout or --weight-decay, use a smaller model (--hidden)" in worded(warnings[0])


def test_no_memorisation_warning_for_a_training_loss_that_only_wobbles() -> None:
    """A run whose held-out loss stalls while its training loss moves by the noise between the
    windows two validations follow is not told it memorises (a run whose learning rate had all but
    vanished was, on 1.996 -> 1.978); a real fall still warns."""
    from types import SimpleNamespace

    from charlm.training.loop import Trainer

    said: list[str] = []
    progress = SimpleNamespace(overfit_warned=False, stale=OVERFIT_PATIENCE, train_at_best=1.996,
                               best_loss=2.168)  # fmt: skip
    trainer = SimpleNamespace(progress=progress, cb=SimpleNamespace(on_status=said.append))
    Trainer._warn_overfit(trainer, {"train_loss": 1.978})  # type: ignore[arg-type]
    assert said == []
    Trainer._warn_overfit(trainer, {"train_loss": 1.90})  # type: ignore[arg-type]
    assert len(said) == 1 and "memorising" in said[0]


def test_train_accepts_the_regularisation_options(in_tmp: Path, corpus: Path) -> None:
    options = ["--cell", "lstm", "--dropout", "0.3", "--weight-drop", "0.2", "--weight-decay", "0.01"]
    result = invoke("train", corpus, "--out", "r", "--max-steps", "6", *options, *TINY_MODEL)
    assert result.exit_code == 0, result.output
    config = rundir.load_run(in_tmp / "r").config
    assert config.model.weight_drop == 0.2 and config.train.weight_decay == 0.01
