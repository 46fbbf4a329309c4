"""Distributed training under torchrun (2 CPU processes, gloo): the same losses and weights as one
process with the same global batch, and resume across a change in the number of processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import metrics

OPTIONS = [
    "--batch-size", "8", "--bptt", "16", "--hidden", "32", "--dropout", "0",
    "--precision", "fp32", "--device", "cpu", "--eval-every", "6", "--decay", "0",
]  # fmt: skip


def train(
    processes: int, *args: object, options: list[str] = OPTIONS, torchrun: bool = True
) -> subprocess.CompletedProcess[str]:
    """``charlm train`` in one process, or in ``processes`` processes under torchrun (or, not
    ``torchrun``, launched by ``charlm train --nproc-per-node``)."""
    launcher = [sys.executable, "-m", "charlm"]
    if processes > 1 and torchrun:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "charlm",
        ]  # fmt: skip
    elif processes > 1:
        args = (*args, "--nproc-per-node", processes)
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


def test_one_command_launches_the_processes_as_torchrun_does(
    single: tuple[Path, Path], tmp_path: Path
) -> None:
    """``charlm train --nproc-per-node 2``: the run torchrun makes, and nothing of the launcher's
    own on the terminal (no thread-count banner)."""
    corpus, reference = single
    result = train(2, corpus, "--out", tmp_path / "dist", "--max-steps", "12", torchrun=False)
    assert "x 2 processes" in result.stderr and "*****" not in result.stderr, result.stderr
    assert result.stderr.count("max_steps: 12 steps") == 1
    assert_same_run(tmp_path / "dist", reference)


@pytest.mark.parametrize("before,after,torchrun", [(2, 1, False), (1, 2, True), (2, 2, False)])
def test_resume_with_another_number_of_processes(
    single: tuple[Path, Path], tmp_path: Path, before: int, after: int, torchrun: bool
) -> None:
    """Weights, optimizer, position and the carried hidden state of every stream are preserved
    (dropout's random streams are not, and this run has no dropout), whichever launched them."""
    corpus, reference = single
    run = tmp_path / "run"
    train(before, corpus, "--out", run, "--max-steps", "6", torchrun=torchrun)
    train(after, "--resume", "--out", run, "--max-steps", "12", options=[], torchrun=not torchrun)
    assert_same_run(run, reference)


def test_the_adaptive_softmax_trains_distributed(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A tail cluster no target of a batch falls in gets no gradient: DDP must allow that."""
    corpus, _ = single
    train(2, corpus, "--out", tmp_path / "run", "--max-steps", "6", "--softmax", "adaptive")
    assert [r["step"] for r in metrics(tmp_path / "run")] == [6]


def launch(tmp_path: Path, *args: object) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``ARGS`` under torchrun in 2 processes, each rank's output kept apart (``--redirects``): the
    result, and each rank's stderr in rank order."""
    logs = tmp_path / "logs"
    # --monitor-interval: on a loaded machine the ranks may take a moment between their exits
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--log-dir", logs, "--redirects", "3", "--monitor-interval", "1", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=180)
    return result, [rank_log(logs, rank) for rank in (0, 1)]


def rank_log(logs: Path, rank: int, stream: str = "stderr") -> str:
    (found,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return found.read_text()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--resume", "--out", "RUN", "--hidden", "64"], 2, "error: --hidden is 32 in this run; 64 given"),
        (["--resume", "--out", "RUN", "--max-steps", "0"], 2, "error: --max-steps must be positive"),
        (["MISSING", "--out", "NEW"], 1, "error: corpus file not found"),
        (["CORPUS", "--out", "NEW", "--batch-size", "9"], 2, "error: --batch-size 9 must divide evenly"),
    ],
)
def test_an_error_under_torchrun_ends_every_rank_with_one_line_and_no_traceback(
    single: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Rank 0 reports an error every rank agreed on; the others end silently with the same code
    (not with a broken connection). torchrun's own report of the failed ranks follows."""
    corpus, run = single
    paths = {"MISSING": str(tmp_path / "missing.txt"), "NEW": str(tmp_path / "new"), "RUN": str(run),
             "CORPUS": str(corpus)}  # fmt: skip
    before = (run / "run.json").read_bytes()
    result, (rank0, rank1) = launch(
        tmp_path, "-m", "charlm", "train", *[paths.get(a, a) for a in args], "--device", "cpu"
    )
    assert result.returncode != 0
    assert rank0.strip().splitlines() == [rank0.strip()] and rank0.startswith(message), rank0
    assert rank1 == "", rank1
    assert re.findall(r"exitcode\s+: (-?\d+)", result.stderr) == [str(code)] * 2  # both, same code
    assert "Traceback" not in rank0 + rank1
    assert (run / "run.json").read_bytes() == before and not (tmp_path / "new").exists()


SETTLE = """
import sys
from charlm.training import distributed
from charlm.errors import CharlmError, CorpusError

ranks = distributed.from_env()
distributed.start(ranks)

def work():
    if ranks.rank == 1:
        raise CorpusError("only this host lacks the corpus")
    return "fine"

try:
    distributed.settle(work, ranks)
except CharlmError as exc:
    print(f"{ranks.rank}|{type(exc).__name__}|{exc}|{exc.exit_code}|{exc.settled}", flush=True)
print(f"{ranks.rank}|after|{distributed.settle(lambda: ranks.rank, ranks)}", flush=True)
distributed.stop()
"""


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--resume", "--out", "RUN", "--hidden", "64"], 2, "error: --hidden is 32 in this run; 64 given"),
        (["CORPUS", "--out", "NEW", "--batch-size", "9"], 2, "error: --batch-size 9 must divide evenly"),
        (["CORPUS", "--cell", "lsmt"], 2, "Usage: "),
        (["CORPUS", "--nnodes", "2"], 2, "error: --nnodes above 1 needs --master-addr"),
        (["CORPUS", "--nproc-per-node", "0"], 2, "error: --nproc-per-node must be at least 1, got 0"),
    ],
)
def test_an_error_with_nproc_per_node_is_one_line_and_the_rank_s_exit_code(
    single: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Every failure of ``charlm train --nproc-per-node 2`` ends the command as one process's:
    one ``error:`` line (or the usage message), the exit code, no traceback from any process."""
    corpus, run = single
    paths = {"NEW": str(tmp_path / "new"), "RUN": str(run), "CORPUS": str(corpus)}
    before = (run / "run.json").read_bytes()
    command = [sys.executable, "-m", "charlm", "train", *[paths.get(a, a) for a in args], "--device", "cpu"]
    if "--nproc-per-node" not in args:
        command += ["--nproc-per-node", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == code, result.stderr
    said = result.stderr.strip()
    assert said.startswith(message) and "Traceback" not in said + result.stdout, said
    if message.startswith("error:"):
        assert said.splitlines() == [said], said
    assert (run / "run.json").read_bytes() == before and not (tmp_path / "new").exists()


def test_a_rank_killed_under_nproc_per_node_is_one_line(corpus_text: str, tmp_path: Path) -> None:
    """A rank that dies without a word (SIGKILL): the others leave silently, the launcher says
    which rank and how."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(corpus_text * 20)
    command = [sys.executable, "-m", "charlm", "train", corpus, "--out", tmp_path / "run", "--max-time", "90",
               "--nproc-per-node", "2", *OPTIONS]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "latest").is_dir():  # training, past its first checkpoint
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.1)
        os.kill(worker(process.pid, rank=1), signal.SIGKILL)
        _, said = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, said
    assert said.strip().splitlines()[-1] == "error: rank 1 was killed by SIGKILL", said
    assert "Traceback" not in said and said.count("error:") == 1, said


def test_ctrl_c_under_nproc_per_node_saves_and_exits_130(corpus_text: str, tmp_path: Path) -> None:
    """Ctrl-C at a terminal reaches the launcher and its ranks (one process group): the run stops
    and saves as one process does, exit 130, and the launcher says nothing of its own."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(corpus_text * 20)
    command = [sys.executable, "-m", "charlm", "train", corpus, "--out", tmp_path / "run", "--max-time", "90",
               "--nproc-per-node", "2", *OPTIONS]  # fmt: skip
    process = subprocess.Popen(
        list(map(str, command)), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "latest").is_dir():
            assert time.monotonic() < deadline and process.poll() is None, "training did not start"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        _, said = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, said
    assert said.strip().splitlines()[-1].startswith("interrupted: "), said
    assert "Traceback" not in said and "death signal" not in said and "error" not in said, said


def worker(launcher: int, rank: int) -> int:
    """The process id of the launcher's worker of ``rank`` (its children's environments)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


def test_a_usage_error_under_torchrun_is_said_once(single: tuple[Path, Path], tmp_path: Path) -> None:
    """A mistake the option parser catches: rank 0 shows the usage message, rank 1 stays quiet,
    both end with exit code 2."""
    corpus, _ = single
    result, (rank0, rank1) = launch(tmp_path, "-m", "charlm", "train", corpus, "--cell", "lsmt")
    assert "Invalid value for '--cell'" in rank0 and rank1 == "", (rank0, rank1)
    assert re.findall(r"exitcode\s+: (-?\d+)", result.stderr) == ["2", "2"]
    assert "Traceback" not in rank0 + rank1


def test_settle_raises_the_failure_of_any_rank_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "settle.py"
    script.write_text(SETTLE)
    result, _ = launch(tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert [rank_log(tmp_path / "logs", rank, "stdout").splitlines() for rank in (0, 1)] == [
        ["0|CorpusError|rank 1: only this host lacks the corpus|1|True", "0|after|0"],  # as rank 0 says it
        ["1|CorpusError|only this host lacks the corpus|1|True", "1|after|1"],  # its own error
    ]


def test_a_collective_broken_by_a_peer_that_ended_is_one_line() -> None:
    from charlm.errors import TrainingError
    from charlm.training.distributed import Ranks, peers_lost

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17837")
    lost = "^lost contact with the other training processes"
    with pytest.raises(TrainingError, match=lost), peers_lost(Ranks(1, 2)):
        raise gone
    for ranks, error in ((Ranks(1, 2), RuntimeError("a bug")), (Ranks(), gone)):
        with pytest.raises(RuntimeError) as caught, peers_lost(ranks):
            raise error
        assert caught.value is error  # anything else passes through untouched


def test_the_launcher_says_which_rank_an_error_of_one_rank_alone_happened_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error only this rank has is raised for it to report, prefixed with its rank, worded by
    each face; an error every rank shares (settled) goes to on_error on rank 0 alone."""
    from charlm.errors import ConfigError, TrainingError
    from charlm.training import distributed
    from charlm.training.distributed import Ranks
    from charlm.training.launch import _rank_errors

    reported: list[str] = []
    with pytest.raises(ConfigError) as caught, _rank_errors(Ranks(1, 2), reported.append):  # type: ignore[arg-type]
        raise ConfigError("try a lower {lr}", fields=("lr",))
    assert str(caught.value) == "rank 1: try a lower lr" and caught.value.exit_code == 2
    assert caught.value.worded(lambda name: "--" + name) == "rank 1: try a lower --lr"
    assert not caught.value.settled and reported == []
    monkeypatch.setattr(distributed, "barrier", lambda ranks: None)  # no process group here
    shared = TrainingError("diverged")
    shared.settled = True
    with pytest.raises(TrainingError) as caught, _rank_errors(Ranks(0, 2), reported.append):  # type: ignore[arg-type]
        raise shared
    assert caught.value is shared and reported == [shared]  # type: ignore[comparison-overlap]


def test_the_rank_killed_first_is_named_not_the_one_the_launcher_then_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a rank is killed, the launcher stops the others with SIGTERM, and may record both
    within one second: the cause is the other signal, whatever the ranks' numbers."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from charlm.errors import TrainingError
    from charlm.training import elastic

    def failures(*_: object) -> None:
        stopped = ProcessFailure(local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file="")
        killed = ProcessFailure(local_rank=1, pid=2, exitcode=-signal.SIGKILL, error_file="")
        stopped.timestamp = killed.timestamp
        raise ChildFailedError("charlm", {0: stopped, 1: killed})

    monkeypatch.setattr(torchrun, "run", failures)
    monkeypatch.setenv(elastic.LAUNCHED, "")  # launch sets it for its ranks: restored after the test
    with pytest.raises(TrainingError, match=r"^rank 1 was killed by SIGKILL$"):
        elastic.launch(["corpus.txt"], processes=2)
