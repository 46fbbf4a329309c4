"""--compile: the training step through torch.compile learns what the uncompiled step learns,
resumes exactly, and a compilation that fails leaves the run training uncompiled.

The first compilation in a fresh cache takes tens of seconds; the tests share one model shape, so
the later ones find it in torch's cache."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import charlm
from charlm.config import Precision, RunConfig
from charlm.runs import checkpoint, rundir
from charlm.training import loop
from charlm.training.loop import fit, prepare_run
from charlm.training.report import SilentCallbacks, StepReport
from tests.test_train import config


class Statuses(SilentCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_status(self, message: str) -> None:
        self.lines.append(message)


def compiled_config(**train: object) -> RunConfig:
    cfg = config(**{"precision": Precision.fp32, "eval_every": 10, **train})
    # no dropout: the compiled step draws its masks from other random streams than eager's
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))


def test_compiled_steps_learn_what_uncompiled_ones_do(tmp_path: Path, corpus: Path) -> None:
    losses = {}
    for compiled in (False, True):
        cfg = compiled_config(max_steps=20, compile=compiled)
        run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / str(compiled))
        statuses = Statuses()
        result = fit(run, train_ids, val_ids, statuses)
        assert result.steps == 20
        assert any("compiling the training step" in s for s in statuses.lines) == compiled
        losses[compiled] = [r["val_loss"] for r in rundir.read_metrics(run.path)]
    # fp32, no dropout: the same sums in another order, so the same losses to float rounding
    assert losses[True] == pytest.approx(losses[False], abs=1e-3)
    assert losses[True][-1] < losses[True][0]


class StopAt(SilentCallbacks):
    """Asks the run to stop (as Ctrl-C does) once it has reported ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.event = step, threading.Event()

    def on_step(self, report: StepReport) -> None:
        if report.step >= self.step:
            self.event.set()


def test_a_compiled_run_resumes_exactly(tmp_path: Path, corpus: Path) -> None:
    options = {"compile": True, "precision": "fp32", "max_steps": 40, "eval_every": 10, "hidden": 32,
               "batch_size": 8, "bptt": 16, "device": "cpu"}  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    charlm.train([corpus], out=straight, **options)
    stop = StopAt(15)
    first = charlm.train([corpus], out=stopped, callbacks=stop, stop=stop.event, **options)
    assert first.stop_reason == "stopped" and 15 <= first.steps < 40
    assert charlm.train(out=stopped, resume=True, **options).steps == 40
    a = checkpoint.load_model(rundir.load_run(straight), checkpoint.LATEST).state_dict()
    b = checkpoint.load_model(rundir.load_run(stopped), checkpoint.LATEST).state_dict()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name  # bit-identical, dropout's masks included


def test_a_failed_compilation_trains_uncompiled(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compiler(module: torch.nn.Module, **_: object) -> Callable[..., None]:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(loop.torch, "compile", no_compiler)
    cfg = compiled_config(max_steps=8, compile=True)
    run, train_ids, val_ids = prepare_run([corpus], cfg, tmp_path / "r")
    statuses = Statuses()
    result = fit(run, train_ids, val_ids, statuses)
    assert result.steps == 8 and result.stop_reason == "max_steps"
    failed = [s for s in statuses.lines if "torch.compile failed" in s]
    assert failed == [  # one line: the first of the error's
        "torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); "
        "training uncompiled"
    ]
