"""Run directories: interrupted saves, strict JSON, the most recent run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from charlm.errors import CheckpointError
from charlm.runs import checkpoint, rundir


def test_a_save_cut_between_its_renames_still_loads(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "best").rename(run_dir / ".best-old")  # the crash: old moved aside, new not in yet
    run = rundir.load_run(run_dir)
    assert checkpoint.load_model(run, checkpoint.BEST) is not None
    assert rundir.latest_run(tmp_path) == run_dir


def test_state_files_are_strict_json(trained_run: Path) -> None:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    for part in ("best/state.json", "latest/state.json", "metrics.jsonl"):
        for line in (
            (trained_run / part).read_text().splitlines()
            if part.endswith("l")
            else [(trained_run / part).read_text()]
        ):
            json.loads(line, parse_constant=refuse)


def test_runs_without_a_checkpoint_are_not_the_most_recent(trained_run: Path, tmp_path: Path) -> None:
    shutil.copytree(trained_run, tmp_path / "done")
    fresh = tmp_path / "fresh"  # a run still before its first validation
    fresh.mkdir()
    shutil.copy(trained_run / "run.json", fresh / "run.json")
    assert rundir.latest_run(tmp_path) == tmp_path / "done"


@pytest.mark.parametrize("content", [b"", b"{", b'{"format": "1"}', b'{"format": 1}', b"[]"])
def test_damaged_run_file_is_a_checkpoint_error(trained_run: Path, tmp_path: Path, content: bytes) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "run.json").write_bytes(content)
    with pytest.raises(CheckpointError):
        rundir.load_run(run_dir)
