"""charlm novelty: the longest span copied from the corpus and the copied fraction by window size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.diagnostics import novelty as module
from charlm.diagnostics.novelty import novelty
from tests.conftest import invoke


def brute_force(text: str, corpus: str, windows: tuple[int, ...]) -> tuple[int, dict[int, float]]:
    spans = (text[s : s + m] for m in range(1, len(text) + 1) for s in range(len(text) - m + 1))
    longest = max((len(span) for span in spans if span in corpus), default=0)
    fractions = {}
    for k in windows:
        spans = [text[s : s + k] for s in range(len(text) - k + 1)]
        fractions[k] = sum(span in corpus for span in spans) / len(spans) if spans else 0.0
    return longest, fractions


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    corpus=st.text(alphabet="abcd", max_size=80),
    chunk=st.sampled_from([3, 7, 1 << 22]),
)
def test_novelty_agrees_with_brute_force(text: str, corpus: str, chunk: int) -> None:
    """Exact on small alphabets (many repeats), whatever the chunking of the corpus."""
    old = module._CHUNK
    module._CHUNK = chunk
    try:
        result = novelty(text, corpus, windows=(2, 4, 6))
    finally:
        module._CHUNK = old
    longest, fractions = brute_force(text, corpus, (2, 4, 6))
    assert result.longest_copied == longest
    assert result.copied_fraction == pytest.approx(fractions)
    assert all(span in corpus and len(span) <= longest for span in result.longest_spans)


def test_a_quotation_is_found(corpus_text: str) -> None:
    quote = corpus_text[5000:5300]
    result = novelty("Zq#" + quote + "#qZ", corpus_text)
    assert result.longest_copied >= 300 and quote in result.longest_spans[0]
    assert result.copied_fraction[50] > 0.8
    fresh = novelty("Zq#Xw%Zq#Xw%Zq#Xw%Zq#Xw%", corpus_text)
    assert fresh.longest_copied < 10 and fresh.copied_fraction == {10: 0.0, 20: 0.0, 50: 0.0}


def test_novelty_from_the_command_line(trained_run: Path, corpus_text: str, tmp_path: Path) -> None:
    sample = tmp_path / "sample.txt"
    sample.write_text("@@" + corpus_text[1000:1120] + "@@")
    report = json.loads(invoke("novelty", trained_run, sample, "--json").stdout)
    assert report["longest_copied"] >= 120 and report["characters"] == 124
    assert set(report["copied_fraction"]) == {"10", "20", "50"}
    table = invoke("novelty", trained_run, sample).stdout
    assert "longest copied span" in table
    # piped from charlm sample
    sampled = subprocess.run([sys.executable, "-m", "charlm", "sample", str(trained_run), "--length", "300",
                              "--seed", "1"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    piped = subprocess.run([sys.executable, "-m", "charlm", "novelty", str(trained_run), "-", "--json"],
                           input=sampled, capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(piped.stdout)["characters"] == len(sampled)


def test_a_corpus_that_is_not_here_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    sample = tmp_path / "s.txt"
    sample.write_text("hello")
    result = invoke("novelty", trained_run, sample, "--corpus", tmp_path / "missing.txt")
    assert result.exit_code == 1 and result.output.startswith("error:")
