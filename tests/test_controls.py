"""Sampling controls (stop strings, bans, min-p, penalties), state files and bulk output."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import charlm
from charlm.config import SampleConfig, TokenizerConfig
from charlm.data.tokenizer import train_tokenizer
from charlm.generation import sampling
from charlm.generation.controls import BanFilter, Penalties, StopMatcher, min_p_filter
from tests.conftest import invoke


def test_penalties_on_known_logits() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0]])
    rep = Penalties(1, 4, window=8, repetition=2.0, history=[0, 1, 1])
    assert rep.apply(logits).tolist() == [[1.0, -2.0, 0.5, 3.0]]  # seen: 2 / 2, -1 * 2
    both = Penalties(1, 4, window=8, presence=0.5, frequency=0.25, history=[0, 1, 1])
    assert both.apply(logits).tolist() == [[2.0 - 0.75, -1.0 - 1.0, 0.5, 3.0]]
    both.push(np.array([3]))  # a chosen token counts from now on
    assert both.apply(logits)[0, 3] == 3.0 - 0.75


def test_penalties_count_only_the_window() -> None:
    p = Penalties(2, 5, window=3, frequency=1.0, history=[4, 4, 4, 4])
    assert p.counts[:, 4].tolist() == [3, 3]  # the prime's last 3
    for token in ([0, 1], [0, 1], [0, 2]):
        p.push(np.array(token))
    assert p.counts.tolist() == [[3, 0, 0, 0, 0], [0, 2, 1, 0, 0]]


def test_min_p_keeps_tokens_at_least_min_p_times_the_likeliest() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(min_p_filter(logits, 0.2))
    assert kept.tolist() == [[True, True, True, False]]  # 0.05 < 0.2 * 0.5
    assert np.array_equal(min_p_filter(logits, 0.0), logits)


def test_ban_masks_the_tokens_that_would_complete_a_banned_string() -> None:
    tokenizer = train_tokenizer("abcab xyz\n" * 20, TokenizerConfig())
    ban = BanFilter(tokenizer, ["abc", "z"])
    logits = np.zeros((3, tokenizer.vocab_size))
    masked = ban.apply(logits, ["xab", "xa", "q"])
    banned = [{tokenizer.decode([i]) for i in np.flatnonzero(np.isinf(row))} for row in masked]
    assert banned == [{"c", "z"}, {"z"}, {"z"}]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_strings_match_across_any_split(
    text: str, cuts: list[int], stops: list[str], include: bool
) -> None:
    """However the text arrives in pieces, what is shown is the text up to the first stop string."""
    matcher = StopMatcher(stops, include)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    shown = "".join(matcher.push(text[a:b]) for a, b in itertools.pairwise(bounds)) + matcher.flush()
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if hits:  # the shortest prefix of the text that ends with a stop string
        end, _, stop = min(hits)
        assert shown == text[: end - (0 if include else len(stop))] and matcher.done
    else:
        assert shown == text and not matcher.done


def test_stop_and_ban_from_the_command_line(trained_run: Path) -> None:
    plain = invoke("sample", trained_run, "--length", "300", "--seed", "5", "--prime", "a").stdout
    cut = plain.index("e", 1)  # the first "e" after the prime

    def ended(text: str) -> str:  # as `charlm sample` ends its output
        return text if text.endswith("\n") else text + "\n"

    stopped = invoke("sample", trained_run, "--length", "300", "--seed", "5", "--prime", "a", "--stop", "e")
    assert stopped.stdout == ended(plain[:cut])
    kept = invoke("sample", trained_run, "--length", "300", "--seed", "5", "--prime", "a", "--stop", "e",
                  "--include-stop").stdout  # fmt: skip
    assert kept == plain[: cut + 1] + "\n"
    banned = invoke("sample", trained_run, "--length", "400", "--seed", "5", "--prime", "th", "--ban", "e",
                    "--ban", "th", "--ban", "n ").stdout  # fmt: skip
    assert "e" not in banned and "th" not in banned[1:] and "n " not in banned


def test_every_control_at_once_through_the_api(trained_run: Path) -> None:
    model = charlm.load(trained_run)
    options = dict(min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3,
                   penalty_window=16, ban=["the"], stop=["\n\n"])  # fmt: skip
    text = model.sample(prime="The ", length=200, seed=3, **options)
    assert text == "".join(model.stream(prime="The ", length=200, seed=3, **options))
    assert "the" not in "The " + text
    with pytest.raises(charlm.ConfigError, match="min_p must be in"):
        model.sample(min_p=1.5)
    with pytest.raises(TypeError):
        model.sample(stop_words=["x"])


def test_a_saved_state_continues_exactly_as_reading_the_prime(
    trained_run: Path, tmp_path: Path, corpus: Path
) -> None:
    """``--prime-file F --save-state S --length 0``, then ``--state S``: the same next-token
    distribution (to 1e-6) and, for one seed, the same text as reading F."""
    state = tmp_path / "s.state"
    result = invoke("sample", trained_run, "--prime-file", corpus, "--save-state", state, "--length", "0")
    assert result.exit_code == 0 and result.stdout == "" and state.stat().st_size < 64_000
    model = charlm.load(trained_run)
    read = model.read(corpus.read_text())
    saved = model.load_state(state)
    torch.testing.assert_close(
        torch.softmax(saved.logits, -1), torch.softmax(read.logits, -1), atol=1e-6, rtol=0
    )
    args = ("--length", "80", "--seed", "11")
    direct = invoke("sample", trained_run, "--prime-file", corpus, *args).stdout
    assert invoke("sample", trained_run, "--state", state, *args).stdout == direct
    assert model.sample(length=80, seed=11, state=saved) + "\n" == direct


def test_a_long_prime_is_read_in_windows(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, corpus_text: str
) -> None:
    model = charlm.load(trained_run)
    whole = model.read(corpus_text[:3000])
    monkeypatch.setattr(sampling, "READ_WINDOW", 7)
    windows = model.read(corpus_text[:3000])
    torch.testing.assert_close(windows.logits, whole.logits, atol=1e-5, rtol=1e-5)


def test_a_state_file_is_tied_to_its_run(
    trained_run: Path, tmp_path: Path, in_tmp: Path, corpus: Path
) -> None:
    state = tmp_path / "s.state"
    invoke("sample", trained_run, "--prime", "abc", "--save-state", state, "--length", "0")
    other = tmp_path / "other"
    invoke("train", corpus, "--out", other, "--max-steps", "3", "--hidden", "16", "--embed", "16",
           "--batch-size", "4", "--device", "cpu")  # fmt: skip
    refused = invoke("sample", other, "--state", state)
    assert refused.exit_code == 1 and "a state only continues the model that made it" in refused.output
    assert "(best checkpoint)" in refused.output  # and which it was
    not_state = tmp_path / "x.state"
    not_state.write_bytes(b"\x80\x04not a state")
    assert "not a charlm state file" in invoke("sample", trained_run, "--state", not_state).output


def test_bulk_output_is_one_json_object_per_sample(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    result = invoke("sample", trained_run, "--num-samples", "70", "--length", "40", "--seed", "2",
                    "--stop", "\n", "--temp", "0.9", "--output", out)  # fmt: skip
    assert result.exit_code == 0 and result.stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in records] == list(range(70))  # two batches (64 + 6)
    for r in records:
        assert r["seed"] == 2 and r["parameters"]["temperature"] == 0.9 and r["parameters"]["stop"] == ["\n"]
        assert 1 <= r["tokens"] <= 40 and "\n" not in r["text"]
        assert r["stopped"] or r["tokens"] == 40
    again = tmp_path / "again.jsonl"
    invoke("sample", trained_run, "--num-samples", "70", "--length", "40", "--seed", "2", "--stop", "\n",
           "--temp", "0.9", "--output", again)  # fmt: skip
    assert again.read_text() == out.read_text()  # the seed is recorded: the file is reproducible


def test_the_sampler_matches_the_picker_with_controls_off() -> None:
    """With every control off, the picker draws exactly as before (same ids for the same seed)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    config = SampleConfig(temperature=0.7, top_k=20, top_p=0.9)
    a = sampling.Picker(config, sampling.make_generator(1))(logits)
    b = sampling.Picker(config, sampling.make_generator(1), rows=3, history=[1, 2])(logits)
    assert a.tolist() == b.tolist()
    assert math.isfinite(float(logits.sum()))
