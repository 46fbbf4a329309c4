"""The public Python API: charlm.train and charlm.load, and the same text and figures as the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import charlm
from charlm.training.report import StepReport
from tests.conftest import invoke

TINY = {"hidden": 32, "batch_size": 8, "bptt": 16, "device": "cpu"}


def test_train_takes_the_cli_options_by_name(tmp_path: Path, corpus: Path) -> None:
    """The same options give the same run config in Python as on the command line."""
    result = charlm.train([corpus], out=tmp_path / "py", max_steps=4, eval_every=2, max_time="10m", **TINY)
    assert (result.steps, result.stop_reason, result.run_dir) == (4, "max_steps", tmp_path / "py")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    invoke("train", corpus, "--out", tmp_path / "cli", "--max-steps", "4", "--eval-every", "2",
           "--max-time", "10m", *flags)  # fmt: skip
    config = [json.loads((tmp_path / run / "run.json").read_text())["config"] for run in ("py", "cli")]
    assert config[0] == config[1]
    assert config[0]["train"]["max_time"] == 600


def test_train_reports_through_callbacks_and_stops_when_asked(tmp_path: Path, corpus: Path) -> None:
    """A callback that sets the stop event ends the run at the next step, saved; resume continues."""
    stop = threading.Event()
    steps: list[int] = []

    class Watch(charlm.SilentCallbacks):
        def on_step(self, report: StepReport) -> None:
            steps.append(report.step)
            assert math.isfinite(report.bpc)
            if report.step >= 10:
                stop.set()

    out = tmp_path / "run"
    result = charlm.train(corpus, out=out, max_steps=100, eval_every=50, callbacks=Watch(), stop=stop, **TINY)
    assert result.stop_reason == "stopped" and result.steps == 10 and steps == [1, 10]
    assert json.loads((out / "latest" / "state.json").read_text())["step"] == 10
    again = charlm.train(corpus, out=out, resume=True, max_steps=20, **TINY)  # the same options
    assert (again.stop_reason, again.steps) == ("max_steps", 20)


def test_train_refuses_unknown_options_and_bad_values(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(TypeError, match="hiden"):
        charlm.train(corpus, out=tmp_path / "a", hiden=8)
    with pytest.raises(charlm.ConfigError, match=r"^cell is one of"):
        charlm.train(corpus, out=tmp_path / "b", cell="lsmt")
    with pytest.raises(charlm.ConfigError, match="batch_size must be positive"):
        charlm.train(corpus, out=tmp_path / "c", batch_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_sample_stream_and_the_cli_give_the_same_text(trained_run: Path) -> None:
    model = charlm.load(trained_run)
    text = model.sample(prime="The ", length=60, temperature=0.9, top_k=20, seed=7)
    assert "".join(model.stream(prime="The ", length=60, temperature=0.9, top_k=20, seed=7)) == text
    printed = invoke("sample", trained_run, "--prime", "The ", "--length", "60", "--temp", "0.9",
                     "--top-k", "20", "--seed", "7").stdout  # fmt: skip
    assert printed == "The " + text + ("" if text.endswith("\n") else "\n")
    assert model.sample(prime="The ", length=60, seed=8) != model.sample(prime="The ", length=60, seed=9)


def test_evaluate_gives_the_figure_of_charlm_eval(trained_run: Path, corpus: Path) -> None:
    model = charlm.load(trained_run)
    for args, text in [((), model.run.heldout_text()), (("--data", corpus), corpus.read_text())]:
        printed = json.loads(invoke("eval", trained_run, "--json", *args).stdout)
        score = model.evaluate(text)
        assert (score.loss, score.bpc, score.perplexity, score.tokens, score.characters) == (
            printed["loss"], printed["bpc"], printed["perplexity"], printed["tokens"], printed["characters"],
        )  # fmt: skip
    with pytest.raises(charlm.ConfigError):
        model.evaluate("")


def test_next_token_probs_are_the_model_distribution(trained_run: Path) -> None:
    model = charlm.load(trained_run, checkpoint="latest", device="cpu")
    everything = model.next_token_probs("The quick brown fo", k=10_000)
    assert sum(p for _, p in everything) == pytest.approx(1.0, abs=1e-4)
    top = model.next_token_probs("The quick brown fo", k=5)
    assert top == everything[:5] and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert all(isinstance(piece, str) and piece for piece, _ in top)
    # greedy sampling (another code path: the NumPy stepper) picks the most likely piece
    assert model.sample(prime="The quick brown fo", length=1, temperature=0) == top[0][0]


def test_load_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(charlm.CheckpointError):
        charlm.load(tmp_path / "nothing")


def test_import_charlm_is_instant() -> None:
    """``import charlm`` loads no torch; the API's names load on first use."""
    code = "import sys, charlm; assert 'torch' not in sys.modules; charlm.load; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_example_runs(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, as written, on a tiny corpus (with a tiny model and budget)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("\n## Python\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    shutil.copy(corpus, "corpus.txt")
    shutil.copy(corpus, "test.txt")
    real = charlm.train
    tiny = {**TINY, "max_steps": 12, "eval_every": 6}
    monkeypatch.setattr(charlm, "train", lambda *args, **options: real(*args, **{**options, **tiny}))
    exec(compile(code, "README.md", "exec"), {})
    assert charlm.load("checkpoints/x").run.config.model.hidden == TINY["hidden"]


def test_bulk_chat_and_novelty_through_the_api(trained_run: Path, tmp_path: Path, corpus_text: str) -> None:
    model = charlm.load(trained_run)
    drawn = list(model.samples(5, length=30, seed=4, temperature=0.9, stop=["\n"]))
    out = tmp_path / "s.jsonl"
    invoke("sample", trained_run, "--num-samples", "5", "--length", "30", "--seed", "4", "--temp", "0.9",
           "--stop", "\n", "--output", out)  # fmt: skip
    assert [s.text for s in drawn] == [json.loads(line)["text"] for line in out.read_text().splitlines()]
    talk = model.conversation(length=20, seed=1)
    assert "".join(talk.reply("Hello")) == "".join(model.conversation(length=20, seed=1).reply("Hello"))
    copied = model.novelty("@@" + corpus_text[300:400] + "@@")  # the run's own corpus
    assert copied.longest_copied >= 100
