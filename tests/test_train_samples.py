"""Samples while training: shown in the progress display and logged in RUN/samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY_MODEL, invoke


def samples(run: Path) -> list[dict]:
    file = run / "samples.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def test_a_sample_at_each_validation_by_default(tmp_path: Path, corpus: Path) -> None:
    args = [*TINY_MODEL, "--max-steps", "20", "--eval-every", "10"]
    result = invoke("train", corpus, "--out", tmp_path / "r", *args)
    assert result.exit_code == 0, result.output
    logged = samples(tmp_path / "r")
    assert [s["step"] for s in logged] == [10, 20]
    assert all(0 < len(s["text"]) <= 200 and s["temperature"] == 0.8 for s in logged)
    assert "sample at step 10:" in result.output and "sample at step 20:" in result.output


def test_sample_every_n_steps_or_never(tmp_path: Path, corpus: Path) -> None:
    args = [*TINY_MODEL, "--max-steps", "10", "--eval-every", "100"]
    invoke("train", corpus, "--out", tmp_path / "every", *args, "--sample-every", "4")
    assert [s["step"] for s in samples(tmp_path / "every")] == [4, 8]
    result = invoke("train", corpus, "--out", tmp_path / "never", *args, "--sample-every", "0")
    assert samples(tmp_path / "never") == [] and "sample at step" not in result.output


def test_sampling_leaves_training_unchanged(tmp_path: Path, corpus: Path) -> None:
    """The samples use a generator of their own: the same seed trains the same weights."""
    args = [*TINY_MODEL, "--max-steps", "12", "--eval-every", "4", "--dropout", "0.3"]
    invoke("train", corpus, "--out", tmp_path / "with", *args, "--sample-every", "3")
    invoke("train", corpus, "--out", tmp_path / "without", *args, "--sample-every", "0")
    weights = [(tmp_path / r / "latest" / "model.safetensors").read_bytes() for r in ("with", "without")]
    assert weights[0] == weights[1]


def test_a_resumed_run_logs_its_samples_once(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "r"
    args = [*TINY_MODEL, "--eval-every", "5", "--sample-every", "5"]
    invoke("train", corpus, "--out", out, *args, "--max-steps", "10")
    (out / "samples.jsonl").write_text((out / "samples.jsonl").read_text() + '{"step": 15, "text": "x"}\n')
    invoke("train", corpus, "--out", out, *args, "--max-steps", "20", "--resume")
    assert [s["step"] for s in samples(out)] == [5, 10, 15, 20]
    assert samples(out)[2]["text"] != "x"  # the record past the checkpoint was dropped, then logged again
