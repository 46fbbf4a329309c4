"""Exact resume: a run killed (SIGKILL, SIGTERM, SIGINT) and resumed ends bit-identical to one that
never stopped; signals exit 130/143; one trainer per run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from charlm.runs.lock import RunLock
from tests.conftest import TINY_MODEL, invoke

# Saves every 3 steps, validates every 20: kills land before, between and during saves.
RUN = ["--max-steps", "150", "--eval-every", "20", "--save-every", "3", *TINY_MODEL]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process


def train(*args: str | Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "charlm", "train", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def saved_step(run: Path) -> int:
    try:
        return json.loads((run / "latest" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_step(proc: subprocess.Popen[str], run: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while saved_step(run) < step and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "latest" / "model.safetensors"), load_file(b / "latest" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), name  # bit-identical, not close


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> tuple[Path, Path]:
    """A corpus and the run trained on it without a stop."""
    root = tmp_path_factory.mktemp("reference")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    proc = train(corpus, "--out", root / "run", *RUN)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return corpus, root / "run"


def test_sigkill_and_resume_is_bit_identical(reference: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, uninterrupted = reference
    run = tmp_path / "run"
    proc = train(corpus, "--out", run, *RUN)
    for step in (10, 40, 75, 110):  # kill as soon as a checkpoint past `step` is on disk
        wait_for_step(proc, run, step)
        proc.kill()
        proc.wait()
        proc = train("--resume", "--out", run)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming" in err and "Traceback" not in err
    assert_same_weights(uninterrupted, run)
    # the log reads as if the run had never stopped
    assert (run / "metrics.jsonl").read_text().count("\n") == (
        uninterrupted / "metrics.jsonl"
    ).read_text().count("\n")
    strip = [{k: v for k, v in json.loads(line).items() if not k.startswith(("tokens_per", "elapsed"))}
             for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    expected = [{k: v for k, v in json.loads(line).items() if not k.startswith(("tokens_per", "elapsed"))}
                for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip == expected


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_save_and_exit_with_128_plus_signal(
    reference: tuple[Path, Path], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    corpus, uninterrupted = reference
    run = tmp_path / "run"
    proc = train(corpus, "--out", run, *RUN)
    wait_for_step(proc, run, 30)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    state = json.loads((run / "latest" / "state.json").read_text())
    assert state["interrupted"] and state["step"] >= 30
    assert not (run / ".lock").exists()  # released on the way out
    resumed = train("--resume", "--out", run)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert_same_weights(uninterrupted, run)


def test_a_second_trainer_on_the_same_run_is_refused(trained_run: Path, tmp_path: Path) -> None:
    with RunLock(trained_run):
        result = invoke("train", "--resume", "--out", trained_run)
    assert result.exit_code == 1
    assert "in use by another charlm train" in result.output and f"pid {os.getpid()}" in result.output


def test_a_stale_lock_is_taken_over(reference: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = reference
    run = tmp_path / "run"
    result = invoke("train", corpus, "--out", run, "--max-steps", "4", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    (run / ".lock").write_text("pid 999999 on elsewhere\n")  # left by a process killed with SIGKILL
    result = invoke("train", "--resume", "--out", run, "--max-steps", "8")
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.output
    assert json.loads((run / "latest" / "state.json").read_text())["step"] == 8


def test_resume_may_change_the_precision(reference: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = reference
    run = tmp_path / "run"
    result = invoke("train", corpus, "--out", run, "--max-steps", "4", "--precision", "bf16", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert "in bf16" in result.output
    result = invoke("train", "--resume", "--out", run, "--max-steps", "8", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "in fp32 from step 4" in result.output
    assert json.loads((run / "run.json").read_text())["config"]["train"]["precision"] == "fp32"


def test_resume_refuses_another_corpus_and_model_changes(trained_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("a different text\n" * 500)
    result = invoke("train", other, "--resume", "--out", trained_run)
    assert result.exit_code == 1 and "not the text" in result.output
    result = invoke("train", "--resume", "--out", trained_run, "--hidden", "64")
    assert result.exit_code == 2 and "--hidden is 32 in this run; 64 given" in result.output


def test_running_into_an_existing_run_without_resume_is_refused(trained_run: Path, corpus: Path) -> None:
    before = (trained_run / "latest" / "model.safetensors").read_bytes()
    result = invoke("train", corpus, "--out", trained_run, *TINY_MODEL)
    assert result.exit_code == 1 and "--resume" in result.output
    assert (trained_run / "latest" / "model.safetensors").read_bytes() == before


def test_a_run_stopped_before_it_existed_starts_again(reference: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = reference
    run = tmp_path / "run"
    run.mkdir()  # killed while preparing the corpus: a directory, no run.json
    result = invoke("train", "--resume", "--out", run)
    assert result.exit_code == 1 and "before training began" in result.output
    result = invoke("train", corpus, "--resume", "--out", run, "--max-steps", "3", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert f"no run in {run} yet: starting it" in result.output
    assert (run / "run.json").is_file()


# The command a user (or a job scheduler) runs every time: the first launch and every relaunch.
COMMAND = ["--optimizer", "adam", "--dropout", "0.1", "--seed", "7", *TINY_MODEL]


def state(run: Path) -> dict:
    return json.loads((run / "latest" / "state.json").read_text())


def test_the_same_command_with_resume_starts_and_then_continues_the_run(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = invoke("train", corpus, "--out", run, "--max-steps", "4", *COMMAND, "--resume")
    assert first.exit_code == 0, first.output
    assert f"no run in {run} yet: starting it" in first.output and state(run)["step"] == 4
    again = invoke("train", corpus, "--out", run, "--max-steps", "4", *COMMAND, "--resume")
    assert again.exit_code == 0, again.output  # every option given again, each with the run's value
    assert f"resuming {run} from step 4" in again.output and "starting" not in again.output
    longer = invoke("train", corpus, "--out", run, "--max-steps", "8", *COMMAND, "--resume")
    assert longer.exit_code == 0, longer.output  # a stop condition may change
    assert "from step 4" in longer.output and state(run)["step"] == 8
    assert json.loads((run / "run.json").read_text())["config"]["train"]["max_steps"] == 8


def test_a_run_whose_time_is_spent_does_not_step_again(corpus: Path, tmp_path: Path) -> None:
    """The same --max-time command run again (a job scheduler's relaunch) leaves a finished run as
    it is: each relaunch trained one step more, changed the optimizer state and logged again."""
    run = tmp_path / "run"
    command = ["train", corpus, "--out", run, "--max-time", "1s", "--epochs", "1000", *COMMAND, "--resume"]
    first = invoke(*command)
    assert first.exit_code == 0 and "max_time:" in first.output, first.output  # its time, not its epochs
    step, saved = state(run)["step"], (run / "latest" / "trainer.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    again = invoke(*command)
    assert again.exit_code == 0, again.output
    assert state(run)["step"] == step and (run / "latest" / "trainer.safetensors").read_bytes() == saved
    assert (run / "metrics.jsonl").read_text() == metrics


def test_without_out_resume_finds_the_run_of_its_corpus(in_tmp: Path, corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    command = ["train", corpus, "--max-steps", "2", *COMMAND, "--resume"]
    first = invoke(*command)
    assert first.exit_code == 0, first.output
    assert "no run of" in first.output and "starting checkpoints/tiny" in first.output
    assert invoke("train", other, "--max-steps", "2", *COMMAND).exit_code == 0  # the most recent run
    again = invoke(*command[:3], "4", *command[4:])
    assert again.exit_code == 0, again.output
    assert "resuming checkpoints/tiny from step 2" in again.output  # its own run, not the latest one
    assert sorted(p.name for p in (in_tmp / "checkpoints").iterdir()) == ["other", "tiny"]


def test_an_option_given_another_value_is_refused_with_both_values(trained_run: Path, corpus: Path) -> None:
    before = {
        p: p.read_bytes() for p in (trained_run / "run.json", trained_run / "latest" / "model.safetensors")
    }
    result = invoke(
        "train", corpus, "--resume", "--out", trained_run, *TINY_MODEL,
        "--hidden", "64", "--batch-size", "16", "--tokenizer", "bpe", "--tie-weights",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    for part in (
        "--hidden is 32 in this run; 64 given",
        "--batch-size is 8 in this run; 16 given",
        "--tokenizer is char in this run; bpe given",
        "--tie-weights is off in this run; on given",
    ):
        assert part in error
    assert error.startswith("error: ") and "--max-steps" in error  # and what may change
    assert "Traceback" not in result.output
    assert all(path.read_bytes() == data for path, data in before.items())  # nothing was touched


def test_an_explicit_value_equal_to_the_runs_own_is_accepted(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # --lr and --clip as the optimizer's defaults the run trained with; the model's defaults it kept
    same = ["--lr", "0.003", "--clip", "1", "--dropout", "0", "--cell", "mingru", "--tokenizer", "char"]
    result = invoke("train", "--resume", "--out", run, "--max-steps", "40", *same)
    assert result.exit_code == 0, result.output
    result = invoke("train", "--resume", "--out", run, "--lr", "0.01")
    assert result.exit_code == 2 and "--lr is 0.003 in this run; 0.01 given" in result.output
