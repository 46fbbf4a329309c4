"""Fine-tuning (``charlm train SMALL --init-from RUN``): a new run that starts from another run's
weights, tokenizer and model; resumed, sampled, scored and served like any run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import charlm
from charlm.config import DEFAULT_LR, FINE_TUNE_LR, OptimizerKind
from charlm.errors import ConfigError
from tests.conftest import invoke

# Only the batch layout and the device: the model's options come from the parent.
OPTIONS = ["--batch-size", "8", "--bptt", "16", "--device", "cpu", "--eval-every", "5"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """Text of another part of the same documentation, with characters the parent may not have."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(corpus_text[::-1][:8_000] + "\nfine-tuned: ü ß\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, small: Path) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "ft"
    result = invoke("train", small, "--init-from", trained_run, "--out", out, "--max-steps", "10", *OPTIONS)
    assert result.exit_code == 0, result.output
    assert f"starting from the best weights of {trained_run}" in result.output
    return out


def manifest_sha(run: Path, tag: str) -> str:
    manifest = json.loads((run / tag / "manifest.json").read_text())
    return manifest["files"]["model.safetensors"]["sha256"]


def test_a_fine_tuned_run_records_its_parent_and_keeps_its_tokenizer_and_model(
    tuned: Path, trained_run: Path, small: Path
) -> None:
    meta, parent = (json.loads((run / "run.json").read_text()) for run in (tuned, trained_run))
    assert meta["parent"] == {
        "run": str(trained_run),
        "checkpoint": "best",
        "weights_sha256": manifest_sha(trained_run, "best"),
    }
    assert meta["config"]["model"] == parent["config"]["model"]
    assert meta["config"]["tokenizer"] == parent["config"]["tokenizer"]
    assert meta["config"]["corpus"] == [str(small)]
    assert (tuned / "tokenizer.model").read_bytes() == (trained_run / "tokenizer.model").read_bytes()
    # without --lr, a tenth of the optimizer's default, recorded
    assert meta["config"]["train"]["lr"] == pytest.approx(FINE_TUNE_LR * DEFAULT_LR[OptimizerKind.adam])
    assert json.loads((tuned / "latest" / "state.json").read_text())["step"] == 10


def test_it_starts_from_the_parents_weights(trained_run: Path, small: Path, tmp_path: Path) -> None:
    """With a learning rate too small to move them, the weights after a step are the parent's."""
    result = charlm.train(
        small, out=tmp_path / "ft", init_from=trained_run, checkpoint="latest", lr=1e-12, max_steps=1,
        batch_size=8, bptt=16, device="cpu",
    )  # fmt: skip
    assert result.steps == 1
    before = load_file(trained_run / "latest" / "model.safetensors")
    after = load_file(tmp_path / "ft" / "latest" / "model.safetensors")
    for name, weights in before.items():
        assert after[name].allclose(weights, atol=1e-8), name
    meta = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert meta["parent"]["checkpoint"] == "latest"
    assert meta["parent"]["weights_sha256"] == manifest_sha(trained_run, "latest")


def test_model_options_given_again_must_keep_the_parents_values(
    trained_run: Path, small: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    result = invoke("train", small, "--init-from", trained_run, "--out", out, "--hidden", "64",
                    "--tokenizer", "bpe", *OPTIONS)  # fmt: skip
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in result.output
    assert "--hidden is 32 in the run it starts from; 64 given" in error
    assert "--tokenizer is char in the run it starts from; bpe given" in error
    assert not out.exists()
    with pytest.raises(ConfigError, match="hidden is 32 in the run it starts from; 64 given"):
        charlm.train(small, out=out, init_from=trained_run, hidden=64)
    same = invoke("train", small, "--init-from", trained_run, "--out", out, "--hidden", "32",
                  "--max-steps", "2", *OPTIONS)  # fmt: skip
    assert same.exit_code == 0, same.output  # the parent's own value is fine


def test_checkpoint_needs_init_from(small: Path, tmp_path: Path) -> None:
    result = invoke("train", small, "--out", tmp_path / "x", "--checkpoint", "latest", *OPTIONS)
    assert result.exit_code == 2 and "--checkpoint chooses the weights of the run given as --init-from" in (
        result.output
    )


def test_a_fine_tuned_run_resumes_samples_evaluates_and_serves(
    tuned: Path, trained_run: Path, small: Path, tmp_path: Path
) -> None:
    run = tmp_path / "ft"

    shutil.copytree(tuned, run)
    # the command that started it, with --resume: it continues the run (same parent)
    again = invoke("train", small, "--init-from", trained_run, "--out", run, "--resume", "--max-steps", "15",
                   *OPTIONS)  # fmt: skip
    assert again.exit_code == 0, again.output
    assert f"resuming {run} from step 10" in again.output
    other = invoke("train", small, "--init-from", run, "--out", run, "--resume", *OPTIONS)
    assert other.exit_code == 2 and f"was started from {trained_run}" in other.output
    sampled = invoke("sample", run, "--length", "20", "--seed", "1", "--prime", "The ", "--temp", "0.9")
    assert sampled.exit_code == 0 and sampled.stdout.startswith("The "), sampled.output
    scored = invoke("eval", run, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["bpc"] > 0

    from tests.test_serve import Running

    server = Running(run)
    try:
        done = server.client().completions.create(
            model="tiny", prompt="The ", max_tokens=20, seed=1, temperature=0.9
        )
    finally:
        server.close()
    text = done.choices[0].text
    assert sampled.stdout == "The " + text + ("" if text.endswith("\n") else "\n")  # the same text


def test_a_fine_tuned_run_stopped_before_its_first_checkpoint_starts_again_from_its_parent(
    tuned: Path, trained_run: Path, small: Path, tmp_path: Path
) -> None:
    """It has no checkpoint of its own: it starts from the weights it recorded, and refuses to start
    from others if the parent's checkpoint has changed since."""

    run, parent = tmp_path / "ft", tmp_path / "parent"
    shutil.copytree(trained_run, parent)
    first = charlm.train(small, out=run, init_from=parent, lr=1e-12, max_steps=1, batch_size=8, bptt=16,
                         device="cpu", checkpoint="latest")  # fmt: skip
    assert first.steps == 1
    for tag in ("best", "latest"):
        shutil.rmtree(run / tag)
    again = invoke("train", "--resume", "--out", run)
    assert again.exit_code == 0 and "no checkpoint yet" in again.output, again.output
    shutil.rmtree(run / "latest")
    shutil.rmtree(run / "best")
    shutil.rmtree(parent / "latest")
    shutil.copytree(tuned / "latest", parent / "latest")  # other weights under the parent's tag
    refused = invoke("train", "--resume", "--out", run)
    assert refused.exit_code == 1 and "not the one this run started from" in refused.output
