"""Runs written before the layout by stage (commit 529be16), and scan runs written before the
squared ReLU (their MLP's GELU), load, sample, score and resume unchanged.

Each fixture was trained by the code before the change; its expected.json holds what it printed then.
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
GELU_RUN = Path(__file__).parent / "fixtures" / "run-mingru-gelu"


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(OLD_RUN, tmp_path / "old-run"))


@pytest.fixture()
def gelu_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GELU_RUN, tmp_path / "gelu-run"))


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
    args = ["--data", old_run / data] if data == "base.txt" else []  # else its held-out split
    printed = json.loads(invoke("eval", old_run, "--json", "--precision", "fp32", *args).stdout)
    for name, value in expected()[key].items():  # the precision is the CLI's, the rest the score's
        assert (printed[name] if name == "precision" else getattr(then, name)) == value, name
    now = evaluate(model.network, ids, len(text), model.run.tokenizer.newline_id)
    assert (printed["tokens"], printed["loss"], printed["bpc"]) == (now.tokens, now.loss, now.bpc)
    assert now.loss != then.loss


def test_an_old_run_resumes(old_run: Path) -> None:
    """It goes on, and validates as it did (pieces reading nothing before their own): scored the
    way runs are now, its first validation would beat its best by the change of layout alone."""
    from charlm.model.scoring import evaluate

    args = ["--resume", "--max-steps", "40", "--precision", "fp32"]
    result = invoke("train", old_run / "corpus.txt", "--out", old_run, *args)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "max_steps: 40 steps" in result.output
    records = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    model = charlm.load(old_run, checkpoint="latest")  # the weights step 40 validated
    assert model.run.config.train.eval_context == 0
    text = (old_run / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.from_numpy(model.run.tokenizer.encode_array(text))
    newline = model.run.tokenizer.newline_id
    as_then = evaluate(model.network, ids, len(text), newline, context=0)
    as_now = evaluate(model.network, ids, len(text), newline)
    assert records[-1]["val_loss"] == pytest.approx(as_then.loss, rel=1e-6)
    assert records[-1]["val_loss"] != pytest.approx(as_now.loss, rel=1e-6)


def test_a_new_run_records_what_its_validation_reads(tmp_path: Path) -> None:
    from charlm.config import EVAL_CONTEXT

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20, encoding="utf-8")
    args = ["--hidden", "16", "--layers", "1", "--batch-size", "4", "--bptt", "16", "--max-steps", "2"]
    assert invoke("train", corpus, "--out", tmp_path / "r", *args).exit_code == 0
    assert charlm.load(tmp_path / "r").run.config.train.eval_context == EVAL_CONTEXT > 0


def test_a_scan_run_from_before_the_squared_relu_keeps_its_gelu(gelu_run: Path) -> None:
    """A minGRU run written when the scan blocks' MLP had GELU (its config has no ``mlp``) is read
    as GELU: it samples the text and scores the figures that code printed, on the CPU's fast path
    and through the module, and it resumes as GELU."""
    from charlm.config import Activation

    was = json.loads((GELU_RUN / "expected.json").read_text())
    model = charlm.load(gelu_run)
    assert model.run.config.model.mlp is Activation.gelu
    printed = invoke("sample", gelu_run, "--seed", "1", "--length", "60", "--prime", "To ").stdout
    assert printed == was["sample_seed_1_length_60_prime_To"]
    args = ["--json", "--precision", "fp32", "--data", gelu_run / "base.txt"]
    scored = json.loads(invoke("eval", gelu_run, *args).stdout)
    assert {k: scored[k] for k in was["eval_base_txt"]} == pytest.approx(was["eval_base_txt"], rel=1e-6)
    args = ["--resume", "--max-steps", "40", "--precision", "fp32"]
    result = invoke("train", gelu_run / "corpus.txt", "--out", gelu_run, *args)
    assert result.exit_code == 0, result.output
    assert charlm.load(gelu_run, checkpoint="latest").run.config.model.mlp is Activation.gelu
