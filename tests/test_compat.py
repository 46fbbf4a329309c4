"""Runs written before the layout by stage (commit 529be16) load, sample, score and resume unchanged.

The fixture was trained by that commit's code; expected.json holds what it printed then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import charlm
from tests.conftest import invoke

OLD_RUN = Path(__file__).parent / "fixtures" / "run-529be16"


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    copy = tmp_path / "old-run"
    shutil.copytree(OLD_RUN, copy)
    return copy


def expected() -> dict:
    return json.loads((OLD_RUN / "expected.json").read_text())


def test_an_old_run_samples_the_same_text(old_run: Path) -> None:
    printed = invoke("sample", old_run, "--seed", "1", "--length", "60", "--prime", "To ").stdout
    assert printed == expected()["sample_seed_1_length_60_prime_To"]
    assert "To " + charlm.load(old_run).sample(prime="To ", length=60, seed=1) + "\n" == printed


@pytest.mark.parametrize("data,key", [("heldout.txt", "eval_heldout"), ("base.txt", "eval_base_txt")])
def test_an_old_run_scores_the_same(old_run: Path, data: str, key: str) -> None:
    """Scored as that code scored (its 32 pieces each started from nothing: ``context=0``), the
    figures it printed, to the last digit; and ``charlm eval`` prints what the API computes now
    (each piece after the first reading the text before it)."""
    from charlm.model.scoring import evaluate

    model = charlm.load(old_run)
    text = (old_run / data).read_text(encoding="utf-8")
    ids = torch.from_numpy(model.run.tokenizer.encode_array(text))
    then = evaluate(model.network, ids, len(text), model.run.tokenizer.newline_id, context=0)
    for name, value in expected()[key].items():
        assert getattr(then, name, value) == value, name
    args = ["--data", old_run / data] if data == "base.txt" else []  # else its held-out split
    printed = json.loads(invoke("eval", old_run, "--json", "--precision", "fp32", *args).stdout)
    now = evaluate(model.network, ids, len(text), model.run.tokenizer.newline_id)
    assert (printed["tokens"], printed["loss"], printed["bpc"]) == (now.tokens, now.loss, now.bpc)
    assert now.loss != then.loss


def test_an_old_run_resumes(old_run: Path) -> None:
    result = invoke("train", old_run / "corpus.txt", "--out", old_run, "--resume", "--max-steps", "40")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "max_steps: 40 steps" in result.output
    assert [r["step"] for r in map(json.loads, (old_run / "metrics.jsonl").read_text().splitlines())] == [
        10, 20, 30, 40,
    ]  # fmt: skip
