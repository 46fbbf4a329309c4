"""The training loop: it learns, it is reproducible, and it stops when told."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from charlm.config import Cell, ModelConfig, OptimizerKind, RunConfig, TokenizerConfig, TrainConfig
from charlm.model.network import RNNLM, detach_hidden
from charlm.runs import checkpoint, rundir
from charlm.training.loop import fit, prepare_run, train_step


def config(**train: object) -> RunConfig:
    options: dict = {
        "batch_size": 8,
        "bptt": 16,
        "device": "cpu",
        "eval_every": 10,
        "optimizer": OptimizerKind.adam,
    }
    return RunConfig(
        tokenizer=TokenizerConfig(),
        model=ModelConfig(hidden=32, dropout=0.1),
        train=TrainConfig(**{**options, **train}),
    )


def test_training_lowers_validation_loss(tmp_path: Path, corpus: Path) -> None:
    """Below where the model starts: the tokens' frequencies (its output bias), which a model of 32
    units at the default learning rate does not leave in 200 steps of this 20 KB corpus."""
    cfg = config(max_steps=100, lr=0.02, eval_every=20)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden=64, embed=64))
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "run")
    result = fit(run, train_ids, val_ids)
    records = rundir.read_metrics(run.path)
    assert result.steps == 100 and result.stop_reason == "max_steps"
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
    assert result.best is not None and result.best.loss == min(r["val_loss"] for r in records)


def test_same_seed_gives_bit_identical_weights(tmp_path: Path, corpus: Path) -> None:
    weights = []
    for name in ("a", "b"):
        run, train_ids, val_ids = prepare_run([corpus], config(max_steps=12), tmp_path / name)
        fit(run, train_ids, val_ids)
        weights.append(checkpoint.load_model(run, checkpoint.LATEST).state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_clipping_bounds_the_update_and_reports_the_raw_norm() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=9, hidden=8, embed=8, dropout=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randint(0, 9, (5, 2))
    with torch.no_grad():
        model.decoder.weight.mul_(1000)  # a huge gradient
    before = [p.detach().clone() for p in model.parameters()]
    _, norm, _, applied = train_step(model, opt, x, x, None, clip=0.1)
    assert applied
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert norm > 0.1
    assert step <= 0.1 + 1e-5  # SGD with lr 1 moves by exactly the clipped gradient


def test_time_limit_stops_the_run(tmp_path: Path, corpus: Path) -> None:
    run, train_ids, val_ids = prepare_run([corpus], config(max_time=0.5, epochs=1000), tmp_path / "run")
    result = fit(run, train_ids, val_ids)
    assert result.stop_reason == "max_time"
    assert (run.path / "best").is_dir() and (run.path / "latest").is_dir()


def test_epochs_stop_the_run(tmp_path: Path, corpus: Path) -> None:
    run, train_ids, val_ids = prepare_run(
        [corpus], config(epochs=1, batch_size=64, bptt=64), tmp_path / "run"
    )
    result = fit(run, train_ids, val_ids)
    per_epoch = -(-(train_ids.numel() // 64 - 1) // 64)
    assert result.stop_reason == "epochs" and result.steps == per_epoch


def test_lr_schedule_holds_then_decays_linearly_to_zero() -> None:
    from charlm.training.loop import lr_scale

    assert lr_scale(0.0, 0.3) == lr_scale(0.7, 0.3) == 1.0
    assert abs(lr_scale(0.85, 0.3) - 0.5) < 1e-12
    assert lr_scale(1.0, 0.3) == 0.0
    assert lr_scale(0.99, 0.0) == 1.0  # decay off


def test_plateau_anneals_the_learning_rate(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each validation that does not beat the best so far multiplies the lr by ``anneal``."""
    from charlm.training import loop as module

    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.9])  # validations 3 and 4 are worse than the best

    def total_nats(model: object, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(next(scripted) * ids.numel(), dtype=torch.float64)  # nats summed over ids

    monkeypatch.setattr(module, "total_nats", total_nats)
    cfg = config(max_steps=50, lr=0.004, decay=0.0, eval_every=10, anneal=0.5)
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "run")
    fit(run, train_ids, val_ids)
    records = rundir.read_metrics(run.path)
    assert [r["val_loss"] for r in records] == pytest.approx([3.0, 2.0, 2.5, 2.6, 1.9])
    # the lr logged at a validation carries the annealing of the validations before it
    assert [r["lr"] for r in records] == pytest.approx([0.004, 0.004, 0.004, 0.002, 0.001])


@pytest.mark.parametrize(
    ("cell", "lrs"), [("lstm", [0.004, 0.004, 0.004, 0.002, 0.001]), ("mingru", [0.004] * 5)]
)
def test_plateau_annealing_follows_the_cell(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, cell: str, lrs: list[float]
) -> None:
    """Where ``anneal`` is not given, the classic cells halve the lr at a validation that does not
    improve and the scan cells keep it (their final decay alone ends the run low)."""
    from charlm.training import loop as module

    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.9])

    def total_nats(model: object, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(next(scripted) * ids.numel(), dtype=torch.float64)

    monkeypatch.setattr(module, "total_nats", total_nats)
    cfg = config(max_steps=50, lr=0.004, decay=0.0, eval_every=10)
    cfg = dataclasses.replace(cfg, model=ModelConfig(cell=Cell(cell), hidden=32))
    assert cfg.train.anneal is None
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "run")
    fit(run, train_ids, val_ids)
    assert [r["lr"] for r in rundir.read_metrics(run.path)] == pytest.approx(lrs)


def test_trainer_carries_the_hidden_state_between_windows(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each window starts from the previous window's final state, detached; an epoch from zeros."""
    from charlm.training import loop as module

    calls = []
    real_step = module.train_step

    def spy(model, optimizer, x, y, hidden, clip, autocast=None, agree=None):  # type: ignore[no-untyped-def]
        loss, norm, new_hidden, applied = real_step(model, optimizer, x, y, hidden, clip, autocast, agree)
        calls.append((hidden, new_hidden))
        return loss, norm, new_hidden, applied

    monkeypatch.setattr(module, "train_step", spy)
    cfg = config(epochs=2, batch_size=32, bptt=64, eval_every=1000)
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "run")
    fit(run, train_ids, val_ids)
    per_epoch = len(calls) // 2
    assert per_epoch >= 3
    for k, (hidden_in, _) in enumerate(calls):
        if k % per_epoch == 0:
            assert all(torch.count_nonzero(h) == 0 for h in hidden_in)
        else:
            previous_out = calls[k - 1][1]
            for h_in, h_out in zip(hidden_in, previous_out, strict=True):
                assert torch.equal(h_in, h_out.detach()) and not h_in.requires_grad


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_a_bf16_autocast_step_learns_and_keeps_fp32_weights_and_state(softmax: str) -> None:
    from charlm.config import Softmax

    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=12, hidden=16, dropout=0.0, softmax=Softmax(softmax)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.arange(12).repeat(4).view(16, 3) % 12  # (T, B): a fixed cycle, easy to learn
    y = (x + 1) % 12
    hidden = model.init_hidden(3)
    losses = []
    for _ in range(30):
        loss, _, hidden, applied = train_step(model, optimizer, x, y, hidden, 1.0, torch.bfloat16)
        hidden = detach_hidden(hidden)
        losses.append(float(loss))
        assert applied
    assert losses[-1] < losses[0] - 0.3
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(h.dtype == torch.float32 for h in hidden)


def test_precision_auto_uses_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from charlm import device as module
    from charlm.config import OptimizerKind, Precision

    cpu = torch.device("cpu")
    assert module.resolve_precision(Precision.fp32, cpu, OptimizerKind.adam) is None
    # asked for by name: emulated where the CPU lacks it
    assert module.resolve_precision(Precision.bf16, cpu, OptimizerKind.adam) is torch.bfloat16
    monkeypatch.setattr(module, "cpu_has_bf16", lambda: False)
    assert module.resolve_precision(Precision.auto, cpu, OptimizerKind.adam) is None
    monkeypatch.setattr(module, "cpu_has_bf16", lambda: True)
    assert module.resolve_precision(Precision.auto, cpu, OptimizerKind.adam) is torch.bfloat16
    # plain SGD trains in fp32 unless bf16 is asked for by name
    assert module.resolve_precision(Precision.auto, cpu, OptimizerKind.sgd) is None
    assert module.resolve_precision(Precision.bf16, cpu, OptimizerKind.sgd) is torch.bfloat16


def test_a_sample_without_a_prime_starts_with_corpus_text(trained_run: Path, corpus_text: str) -> None:
    """The output bias starts at the log-frequencies of the training text's tokens. From a zero
    bias, the start of text (a near-empty state) scored the vocabulary near-uniformly: a briefly
    trained run put most of its first token's probability on byte pieces its corpus never has,
    and samples without a prime began with a stray byte."""
    import charlm

    model = charlm.load(trained_run, device="cpu")
    first = model.next_token_probs("", k=10**6)  # every token, after the start-of-text newline
    assert sum(p for piece, p in first if piece not in set(corpus_text)) < 0.01
