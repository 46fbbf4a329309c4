"""Nothing lost, nothing trusted blindly: verified checkpoints, safe loading, non-finite steps,
a full disk."""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from charlm.data.prepare import builtin_corpus
from charlm.model.network import RNNLM
from charlm.runs import checkpoint, rundir
from charlm.training.loop import MAX_BAD_STEPS, fit, prepare_run
from tests.conftest import TINY_MODEL, invoke


@pytest.fixture()
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's trained run, free to damage."""
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    marker: Path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_a_pickle_posing_as_weights_is_refused_and_never_run(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = Payload()
    payload.marker = marker
    weights = run_copy / "best" / checkpoint.WEIGHTS_FILE
    weights.write_bytes(pickle.dumps(payload))
    # A careful attacker also fixes the manifest, so the checksum cannot be what stops it.
    manifest_file = run_copy / "best" / checkpoint.MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    manifest["files"][checkpoint.WEIGHTS_FILE]["sha256"] = checkpoint.sha256(weights.read_bytes())
    manifest_file.write_text(json.dumps(manifest))
    torch.save({"x": payload}, run_copy / "best" / "model.pt")  # a torch pickle beside it is ignored

    result = invoke("sample", run_copy, "--length", "5")
    assert result.exit_code == 1
    assert "model.safetensors is not a safetensors file" in result.output
    assert not marker.exists()


def test_loading_never_uses_pickle() -> None:
    """Static guard: no code path can unpickle (torch.load, pickle) a file."""
    for source in Path(checkpoint.__file__).parents[1].rglob("*.py"):  # all of charlm
        text = source.read_text()
        assert not re.search(r"(?<![_\w])torch\.load\(|import pickle|pickle\.load", text), source


def test_weights_load_onto_the_cpu_whatever_device_saved_them(run_copy: Path) -> None:
    # safetensors holds no device: what a GPU run saves is these same bytes.
    run = rundir.load_run(run_copy)
    model = checkpoint.load_model(run, "best", "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda f: f.write_bytes(b""), "model.safetensors is damaged"),
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "model.safetensors is damaged"),
        (lambda f: f.write_bytes(f.read_bytes()[:-1] + b"\x01"), "model.safetensors is damaged"),
        (lambda f: f.unlink(), "model.safetensors is missing"),
        (lambda f: (f.parent / "manifest.json").write_text("{"), "manifest.json is damaged"),
        (lambda f: (f.parent / "state.json").write_text("{}"), "state.json is damaged"),
    ],
)
def test_a_damaged_checkpoint_names_the_damaged_file(run_copy: Path, damage, expected: str) -> None:
    damage(run_copy / "best" / checkpoint.WEIGHTS_FILE)
    for command in (["sample", run_copy, "--length", "5"], ["eval", run_copy]):
        result = invoke(*command)
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output


def test_resume_falls_back_to_the_newest_intact_checkpoint(run_copy: Path) -> None:
    best_step = json.loads((run_copy / "best" / "state.json").read_text())["step"]
    latest = run_copy / "latest" / checkpoint.WEIGHTS_FILE
    latest.write_bytes(latest.read_bytes()[:50])
    result = invoke("train", "--resume", "--out", run_copy)
    assert result.exit_code == 0, result.output
    assert "skipping a damaged checkpoint" in result.output and "latest" in result.output
    assert f"resuming {run_copy} from step {best_step}" in result.output


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda run: (run / "tokenizer.model").write_bytes(b"junk"), "tokenizer.model is damaged"),
        (lambda run: (run / "heldout.txt").write_text("other"), "heldout.txt is damaged"),
        (lambda run: (run / "run.json").write_text(""), "run.json is damaged"),
        (lambda run: (run / "run.json").unlink(), "is not a charlm run"),
    ],
)
def test_damaged_run_files(run_copy: Path, damage, expected: str) -> None:
    damage(run_copy)
    result = invoke("eval", run_copy)
    assert result.exit_code == 1 and expected in result.output, result.output


def test_a_run_from_a_newer_charlm_is_refused(run_copy: Path) -> None:
    meta = json.loads((run_copy / "run.json").read_text())
    meta["format"] = checkpoint.FORMAT_VERSION + 1
    (run_copy / "run.json").write_text(json.dumps(meta))
    result = invoke("sample", run_copy)
    assert result.exit_code == 1 and "newer charlm" in result.output and "upgrade" in result.output


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_intact(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {f.name: f.read_bytes() for f in (run_copy / "latest").iterdir()}
    real_write = checkpoint.write_synced

    def fill_up(file: Path, data: bytes) -> None:
        if file.name == checkpoint.TRAINER_FILE:
            real_write(file, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(file, data)

    monkeypatch.setattr(checkpoint, "write_synced", fill_up)
    result = invoke("train", "--resume", "--out", run_copy, "--max-steps", "60", "--save-every", "1")
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "previous checkpoint is intact" in result.output
    assert {f.name: f.read_bytes() for f in (run_copy / "latest").iterdir()} == before
    assert not list(run_copy.glob(".tmp-*"))  # the partial save is cleaned up
    checkpoint.load_snapshot(run_copy / "latest")  # and what is there verifies


@pytest.mark.parametrize("bad_run,restores", [(3, 1), (6, 2)])
def test_non_finite_steps_are_skipped_and_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad_run: int, restores: int
) -> None:
    """Poison the loss once at step 5 and then ``bad_run`` times in a row from step 12: the first
    is skipped; each MAX_BAD_STEPS in a row restore the last good state with a learning rate
    lower each time, and the run finishes finite."""
    from charlm.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig

    corpus = tmp_path / "c.txt"
    corpus.write_text(builtin_corpus()[:20_000])
    config = RunConfig(
        tokenizer=TokenizerConfig(),
        model=ModelConfig(hidden=32),
        train=TrainConfig(batch_size=8, bptt=16, max_steps=30, eval_every=10, save_steps=4, device="cpu"),
    )
    run, train_ids, val_ids = prepare_run([corpus], config, tmp_path / "run")
    poisoned = {5, *range(12, 12 + bad_run)}
    calls = {"n": 0}
    real_features = RNNLM.features

    def features(self: RNNLM, tokens: torch.Tensor, hidden=None):
        output, hidden = real_features(self, tokens, hidden)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poisoned:
                output = output * float("nan")
        return output, hidden

    monkeypatch.setattr(RNNLM, "features", features)
    messages: list[str] = []

    class Record:
        def on_status(self, message: str) -> None:
            messages.append(message)

        def on_step(self, report: object) -> None: ...
        def on_eval(self, record: dict) -> None: ...

    result = fit(run, train_ids, val_ids, Record())
    assert result.steps == 30 and result.skipped_steps == 1 + bad_run
    assert any("step 5: the loss or the gradient is not finite" in m for m in messages)
    restored = [m for m in messages if "restored the state of step 10" in m]
    assert len(restored) == restores == bad_run // MAX_BAD_STEPS
    for i, message in enumerate(restored):
        assert f"multiplied the learning rate by {0.5 ** (i + 1):g}" in message
    state = json.loads((run.path / "latest" / "state.json").read_text())
    assert state["recovery_scale"] == 0.5**restores and state["skipped_steps"] == 1 + bad_run
    weights = checkpoint.load_snapshot(run.path / "latest").weights
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in rundir.read_metrics(run.path))


def test_a_run_that_cannot_start_leaves_no_directory(in_tmp: Path) -> None:
    empty = in_tmp / "empty.txt"
    empty.write_text("")
    result = invoke("train", empty, *TINY_MODEL)
    assert result.exit_code == 1 and "empty" in result.output
    assert not (in_tmp / "checkpoints" / "empty").exists()
