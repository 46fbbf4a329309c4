"""What a command writes, the Python API makes too: the same records, texts and reports, number
for number (compared as JSON, which is what the command writes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import charlm
from charlm import reports
from charlm.cli.app import app
from tests.conftest import invoke


def as_json(value: Any) -> Any:
    """``value`` as a command writes and a reader reads it back."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def model(trained_run: Path) -> charlm.Model:
    return charlm.load(trained_run, device="cpu")


def test_sample_output_records_are_the_api_s(model: charlm.Model, trained_run: Path, tmp_path: Path) -> None:
    options = {"prime": "The ", "length": 25, "seed": 7, "temperature": 0.9, "stop": ["\n"], "ban": ["zz"]}
    out = tmp_path / "s.jsonl"
    result = invoke("sample", trained_run, "--num-samples", "3", "--length", "25", "--seed", "7", "--temp",
                    "0.9", "--stop", "\n", "--ban", "zz", "--prime", "The ", "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    records = list(model.sample_records(3, **options))
    assert records == written  # plain JSON values: equal before any round trip
    assert [r["sample"] for r in records] == [0, 1, 2] and records[0]["parameters"]["prime"] == "The "
    # the text continues the prime, read once: what Model.samples gives
    assert [r["text"] for r in records] == [s.text for s in model.samples(3, **options)]


def test_a_record_without_a_seed_names_one_that_draws_it_again(model: charlm.Model) -> None:
    first = list(model.sample_records(2, length=20, temperature=1.0))
    seed = first[0]["seed"]
    assert isinstance(seed, int) and all(r["seed"] == seed for r in first)
    assert list(model.sample_records(2, length=20, temperature=1.0, seed=seed)) == first
    assert charlm.api.resolve_seed(5) == 5


def test_sample_stdout_is_the_api_s_stream(model: charlm.Model, trained_run: Path) -> None:
    result = invoke("sample", trained_run, "--num-samples", "3", "--length", "30", "--seed", "2",
                    "--prime", "Q", "--temp", "0.9")  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = list(model.stream_samples(3, prime="Q", length=30, seed=2, temperature=0.9))
    assert result.stdout == "".join(text for _, text in shown)
    assert [i for i, _ in shown] == sorted(i for i, _ in shown) and {i for i, _ in shown} == {0, 1, 2}
    assert result.stderr.count("sample ") == 3  # a rule before each sample
    one = invoke("sample", trained_run, "--length", "30", "--seed", "2", "--prime", "Q")
    text = "Q" + model.sample(prime="Q", length=30, seed=2)
    assert one.stdout == text + ("" if text.endswith("\n") else "\n") and one.stderr == ""


def test_sample_from_a_state_and_a_prime_file(model: charlm.Model, trained_run: Path, tmp_path: Path) -> None:
    """--prime-file is read, then --prime on from it; the state saved is the one sampled from."""
    prime_file = tmp_path / "p.txt"
    prime_file.write_text("Some text read first.\n", encoding="utf-8")
    saved = tmp_path / "s.state"
    args = ["--prime-file", prime_file, "--prime", "And ", "--length", "20", "--seed", "3"]
    result = invoke("sample", trained_run, *args, "--save-state", saved)
    assert result.exit_code == 0, result.output
    start = model.read("Some text read first.\n")
    expected = "".join(t for _, t in model.stream_samples(1, prime="And ", length=20, seed=3, state=start))
    assert result.stdout == expected
    again = invoke("sample", trained_run, "--state", saved, "--length", "20", "--seed", "3")
    assert again.stdout == expected.removeprefix("And ")


def test_eval_json_is_the_api_s_report(model: charlm.Model, trained_run: Path, tmp_path: Path) -> None:
    assert json.loads(invoke("eval", trained_run, "--json").stdout) == as_json(reports.eval_report(model))
    text = tmp_path / "other.txt"
    text.write_text("Other text to score, a line or two.\n" * 3, encoding="utf-8")
    args = ["--data", text, "--dynamic", "--dynamic-lr", "0.001", "--json"]
    written = json.loads(invoke("eval", trained_run, *args).stdout)
    report = reports.eval_report(
        charlm.load(trained_run, device="cpu"), [text], dynamic=True, dynamic_lr=0.001
    )
    assert written == as_json(report) and written["data"] == str(text) and "dynamic" in written


def test_diagnose_json_is_the_api_s_report(model: charlm.Model, trained_run: Path) -> None:
    args = ["--depth", "12", "--batches", "1", "--batch-size", "3", "--json"]
    written = json.loads(invoke("diagnose", trained_run, *args).stdout)
    assert written == as_json(reports.gradient_report(model, depth=12, batches=1, batch_size=3))
    fresh = ["--cell", "lstm", "--layers", "1", "--hidden", "8", "--seed", "3"]
    written = json.loads(invoke("diagnose", *fresh, *args).stdout)
    report = reports.fresh_gradient_report("lstm", 1, 8, depth=12, batches=1, batch_size=3, seed=3)
    assert written == as_json(report) and report["model"] == "fresh lstm 1x8"
    assert set(report["spectral_radii"]) == {f"layer 0 {g}" for g in ("input", "forget", "cell", "output")}


def test_the_recall_task_json_is_the_api_s_report() -> None:
    args = ["--task", "--cells", "gru", "--distances", "2", "--task-steps", "5", "--json"]
    written = json.loads(invoke("diagnose", *args).stdout)
    heard: list[tuple[str, int]] = []
    report = reports.recall_report(["gru"], [2], 5, on_result=lambda c, d, a: heard.append((c.value, d)))
    assert written == as_json(report) and heard == [("gru", 2)]
    with pytest.raises(charlm.ConfigError, match="at least 1"):
        reports.recall_report(["gru"], [0], 5)


def test_novelty_json_is_the_api_s_report(trained_run: Path, corpus_text: str, tmp_path: Path) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_text("@@" + corpus_text[2000:2100] + "@@", encoding="utf-8")
    written = json.loads(invoke("novelty", trained_run, sample, "--json").stdout)
    report = reports.novelty_report(sample.read_text(encoding="utf-8"), trained_run)
    assert written == as_json(report) and report["longest_copied"] >= 100
    assert reports.novelty_report(lambda: "@@", trained_run)["characters"] == 2  # read when needed


def test_plot_writes_where_the_api_does(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = reports.training_plot(trained_run, tmp_path / "api.png")
    assert path == tmp_path / "api.png" and path.read_bytes()[:4] == b"\x89PNG"
    result = invoke("plot", trained_run, "--out", tmp_path / "cli.png")
    assert result.exit_code == 0 and f"wrote {tmp_path / 'cli.png'}" in result.stderr.replace("\n", "")


def test_serve_without_starlette_says_how_to_get_it(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "charlm.serve" or m.startswith("charlm.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    result = invoke("serve", trained_run, "--port", "1")
    assert result.exit_code == 1, result.output
    assert "pip install 'charlm[serve]'" in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")


def test_chat_at_a_terminal_without_prompt_toolkit_says_how_to_get_it(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("charlm.cli.chat._interactive", lambda: True)
    monkeypatch.setitem(sys.modules, "prompt_toolkit", None)
    result = invoke("chat", trained_run, "--length", "5")
    assert result.exit_code == 1, result.output
    assert "pip install 'charlm[chat]'" in result.output and "charlm chat at a terminal" in result.output
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")


def test_chat_replies_are_the_api_s_conversation(model: charlm.Model, trained_run: Path) -> None:
    args = ["chat", str(trained_run), "--length", "15", "--seed", "4"]
    result = CliRunner().invoke(app, args, input="Hello\nAgain\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    talk = model.conversation(length=15, seed=4)
    assert result.stdout == "".join("".join(talk.reply(line)) + "\n" for line in ("Hello", "Again"))
