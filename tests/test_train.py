"""The training loop: it learns, it is reproducible, and it stops when told."""

from __future__ import annotations

from pathlib import Path

import torch

from charlm import checkpoint
from charlm.config import ModelConfig, OptimizerKind, RunConfig, TokenizerConfig, TrainConfig
from charlm.model import RNNLM
from charlm.train import fit, prepare_run, train_step


def config(**train: object) -> RunConfig:
    return RunConfig(
        tokenizer=TokenizerConfig(),
        model=ModelConfig(hidden=32, embed=16, dropout=0.1),
        train=TrainConfig(
            batch_size=8, bptt=16, device="cpu", eval_every=10, optimizer=OptimizerKind.adam, **train
        ),  # type: ignore[arg-type]
    )


def test_training_lowers_validation_loss(tmp_path: Path, corpus: Path) -> None:
    run, train_ids, val_ids = prepare_run([corpus], config(max_steps=60), tmp_path / "run")
    result = fit(run, train_ids, val_ids)
    records = checkpoint.read_metrics(run.path)
    assert result.steps == 60 and result.stop_reason == "max_steps"
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
    _, norm, _ = train_step(model, opt, x, x, None, clip=0.1)
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert norm > 0.1
    assert step <= 0.1 + 1e-5  # SGD with lr 1 moves by exactly the clipped gradient


def test_time_limit_stops_the_run(tmp_path: Path, corpus: Path) -> None:
    run, train_ids, val_ids = prepare_run([corpus], config(max_time=0.5, epochs=1000), tmp_path / "run")
    result = fit(run, train_ids, val_ids)
    assert result.stop_reason == "max_time"
    assert (run.path / "best").is_dir() and (run.path / "latest").is_dir()


def test_epochs_stop_the_run(tmp_path: Path, corpus: Path) -> None:
    cfg = config(epochs=1)
    cfg = RunConfig(
        cfg.tokenizer, cfg.model, TrainConfig(**{**cfg.train.__dict__, "batch_size": 64, "bptt": 64})
    )
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "run")
    result = fit(run, train_ids, val_ids)
    per_epoch = -(-(train_ids.numel() // 64 - 1) // 64)
    assert result.stop_reason == "epochs" and result.steps == per_epoch
