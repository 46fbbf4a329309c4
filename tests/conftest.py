"""Shared fixtures: a tiny real corpus (CPython's own docs, offline everywhere), a CLI runner, and
one tiny trained run reused by the sample and eval tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from charlm.cli.app import app
from charlm.data.prepare import builtin_corpus

# Small enough that a CLI run trains in about a second on one CPU core.
TINY_MODEL = [
    "--hidden",
    "32",
    "--layers",
    "2",
    "--batch-size",
    "8",
    "--bptt",
    "16",
    "--device",
    "cpu",
]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the token cache of the test session out of the user's ~/.cache (shared by its tests;
    subprocesses inherit it through the environment)."""
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def invoke(*args: str) -> Result:
    """Run the CLI in-process, as a user would type it."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 20 KB of real English prose and code."""
    return builtin_corpus()[:20_000]


@pytest.fixture()
def corpus(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in an empty directory, so ``checkpoints/`` is the test's own."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """One tiny run, trained once through the CLI, for the sample and eval tests."""
    root = tmp_path_factory.mktemp("session-run")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    out = root / "checkpoints" / "tiny"
    result = invoke(
        "train",
        corpus,
        "--out",
        out,
        "--max-steps",
        "40",
        "--eval-every",
        "15",
        "--optimizer",
        "adam",
        *TINY_MODEL,
    )
    assert result.exit_code == 0, result.output
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
