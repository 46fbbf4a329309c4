"""Distributed training under torchrun (2 CPU processes, gloo): the same losses and weights as one
process with the same global batch, and resume across a change in the number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import metrics

OPTIONS = [
    "--batch-size", "8", "--bptt", "16", "--hidden", "32", "--embed", "16", "--dropout", "0",
    "--precision", "fp32", "--device", "cpu", "--eval-every", "6", "--decay", "0",
]  # fmt: skip


def train(processes: int, *args: object, options: list[str] = OPTIONS) -> subprocess.CompletedProcess[str]:
    """``charlm train`` in one process, or under torchrun in ``processes`` processes."""
    launcher = [sys.executable, "-m", "charlm"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "charlm",
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launcher, "train", *map(str, args), *options]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def assert_same_run(a: Path, b: Path) -> None:
    """The same logged losses (to float tolerance: the batch is split differently) and weights."""
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], rel=1e-5)
    wa, wb = (load_file(run / "latest" / "model.safetensors") for run in (a, b))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    corpus = folder / "tiny.txt"
    corpus.write_text(corpus_text)
    train(1, corpus, "--out", folder / "single", "--max-steps", "12")
    return corpus, folder / "single"


def test_two_processes_train_as_one_with_the_same_global_batch(
    single: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, reference = single
    result = train(2, corpus, "--out", tmp_path / "dist", "--max-steps", "12")
    assert "x 2 processes" in result.stderr  # progress comes from rank 0 only
    assert result.stderr.count("max_steps: 12 steps") == 1
    assert_same_run(tmp_path / "dist", reference)
    state = json.loads((tmp_path / "dist" / "latest" / "state.json").read_text())
    assert state["ranks"] == 2


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(
    single: tuple[Path, Path], tmp_path: Path, before: int, after: int
) -> None:
    """Weights, optimizer, position and the carried hidden state of every stream are preserved
    (dropout's random streams are not, and this run has no dropout)."""
    corpus, reference = single
    run = tmp_path / "run"
    train(before, corpus, "--out", run, "--max-steps", "6")
    train(after, "--resume", "--out", run, "--max-steps", "12", options=[])
    assert_same_run(run, reference)


def test_the_adaptive_softmax_trains_distributed(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A tail cluster no target of a batch falls in gets no gradient: DDP must allow that."""
    corpus, _ = single
    train(2, corpus, "--out", tmp_path / "run", "--max-steps", "6", "--softmax", "adaptive")
    assert [r["step"] for r in metrics(tmp_path / "run")] == [6]


def test_a_batch_that_does_not_split_evenly_is_refused(single: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = single
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "charlm", "train", corpus, "--out", tmp_path / "run", *OPTIONS],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "must divide evenly among 3 processes" in result.stderr
