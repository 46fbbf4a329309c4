"""Batch layout, BPTT windows, evaluation layout, corpus reading and splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from charlm.data.batches import batchify, eval_streams, window, windows
from charlm.data.prepare import builtin_corpus, read_corpus, split_text
from charlm.errors import CorpusError
from tests.conftest import TINY_MODEL, invoke


def test_batchify_matches_the_documented_diagram() -> None:
    ids = torch.arange(24)
    streams = batchify(ids, 4)  # a..x in the module docstring
    assert streams.shape == (4, 6)  # (B, L): the diagram's columns are its rows
    assert streams.data_ptr() == ids.data_ptr()  # a view: memory-mapped ids stay on disk
    assert streams[0].tolist() == [0, 1, 2, 3, 4, 5]  # a b c d e f
    assert streams[:, 0].tolist() == [0, 6, 12, 18]  # a g m s
    x, y = window(streams, 0, 2)
    assert x.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]] and y.tolist() == [[1, 7, 13, 19], [2, 8, 14, 20]]


@given(n=st.integers(2, 300), batch=st.integers(1, 9), bptt=st.integers(1, 20))
def test_windows_cover_each_stream_once_with_targets_one_step_ahead(n: int, batch: int, bptt: int) -> None:
    ids = torch.arange(n).to(torch.uint16)  # as the token cache stores them
    streams = batchify(ids, batch)
    if streams.size(1) < 2:
        assert list(windows(streams, bptt)) == []
        return
    xs, ys = zip(*windows(streams, bptt), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.long
    assert torch.equal(x, streams[:, :-1].t().long())  # every position is an input exactly once, in order
    assert torch.equal(y, x + 1)  # the target is the next token of the same stream
    assert all(w.size(0) <= bptt for w in xs)


@given(n=st.integers(1, 500), streams=st.integers(1, 40))
def test_eval_layout_scores_every_token_exactly_once(n: int, streams: int) -> None:
    ids = torch.arange(1, n + 1)
    layout = eval_streams(ids, start_id=0, streams=streams)
    targets = layout.targets.t().flatten()  # back to text order
    assert targets[targets != -100].tolist() == ids.tolist()
    inputs = layout.inputs.t().flatten()[:n]
    assert inputs.tolist() == [0, *ids[:-1].tolist()]  # each token predicted from the one before


@given(n=st.integers(1, 500), streams=st.integers(1, 40), context=st.integers(0, 80))
def test_each_piece_after_the_first_reads_the_text_before_it(n: int, streams: int, context: int) -> None:
    ids = torch.arange(1, n + 1)
    layout = eval_streams(ids, start_id=0, streams=streams, context=context)
    length, pieces = layout.inputs.shape
    w = layout.context.size(0)
    assert w == (min(context, length) if pieces > 1 else 0)
    flat = layout.inputs.t().flatten()  # every input in text order, padding after the text
    for b in range(1, pieces):  # the W inputs just before its own
        assert layout.context[:, b].tolist() == flat[b * length - w : b * length].tolist()
    # the pieces themselves are as without a context
    plain = eval_streams(ids, start_id=0, streams=streams)
    assert torch.equal(layout.inputs, plain.inputs) and torch.equal(layout.targets, plain.targets)


def test_split_keeps_a_contiguous_tail_at_a_line_start() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert val.startswith("line ") and abs(len(val) / len(text) - 0.1) < 0.01


def test_split_spreads_its_pieces_over_the_text_at_line_starts() -> None:
    text = "".join(f"line {i}\n" for i in range(20_000))  # 208,890 characters: 20 pieces of 2,000+
    train, val = split_text(text, 0.2, 20)
    assert len(train) + len(val) == len(text) and abs(len(val) / len(text) - 0.2) < 0.01
    lines = text.splitlines(keepends=True)
    held = set(val.splitlines(keepends=True))
    assert all(line in set(lines) for line in held) and val.startswith("line ")
    # 20 runs of held-out lines, one in the middle of each twentieth of the text
    runs = [i for i in range(len(lines)) if lines[i] in held and (i == 0 or lines[i - 1] not in held)]
    assert len(runs) == 20
    offsets = [len("".join(lines[:run])) / (len(text) / 20) for run in runs]  # in twentieths
    assert all(abs(offset - (k + 0.4)) < 0.01 for k, offset in enumerate(offsets)), offsets
    assert lines[0] not in held and lines[-1] not in held  # the text's start and end are trained on


def test_read_corpus_joins_files_with_a_newline(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two\n")
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.txt"]) == "one\ntwo\n"


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"  \n\t\n", "whitespace only"),
        (b"ab\x00cd", "NUL byte at offset 2"),
        (b"caf\xe9 au lait", "offset 3"),
    ],
)
def test_bad_corpus_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus([tmp_path / "c.txt"])


def test_other_encodings_are_read_when_named(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_bytes(b"caf\xe9")
    assert read_corpus([tmp_path / "c.txt"], "latin-1") == "café"


def test_missing_and_directory_corpus(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        read_corpus([tmp_path / "nope.txt"])
    with pytest.raises(CorpusError, match="is a directory with no text files in it"):
        read_corpus([tmp_path])


@given(st.lists(st.text(alphabet="ab ", max_size=300), min_size=1, max_size=30), st.floats(0.01, 0.5))
def test_split_never_more_than_doubles_the_validation_share(lines: list[str], fraction: float) -> None:
    text = "\n".join(lines)
    train, val = split_text(text, fraction)
    assert train + val == text
    assert len(val) <= 2 * (len(text) - int(len(text) * (1 - fraction))) + 1


@given(st.text(alphabet="ab\n", max_size=60), st.floats(0.01, 0.99))
def test_the_cut_is_inside_the_text_and_after_the_last_newline_within_reach(
    text: str, fraction: float
) -> None:
    train, val = split_text(text, fraction)
    assert train + val == text
    cut = int(len(text) * (1 - fraction))
    start = max(0, cut - min(1000, (len(text) - cut) // 2))
    newline = text.rfind("\n", start, cut)
    assert len(train) == (newline + 1 if newline >= 0 else cut)


def test_a_run_holds_out_the_pieces_it_records(in_tmp: Path) -> None:
    """`charlm train` holds out what split_text does, in the pieces it records; a corpus too small
    for pieces of 2,000 characters holds out its tail, as runs did before pieces."""
    text = builtin_corpus()[:100_000]
    (in_tmp / "c.txt").write_text(text, encoding="utf-8")
    for pieces, out in ((4, "spread"), (20, "default")):
        options = ["--max-steps", "2", "--val-fraction", "0.1", "--val-pieces", str(pieces)]
        result = invoke("train", "c.txt", "--out", out, *options, *TINY_MODEL)
        assert result.exit_code == 0, result.output
        heldout = (in_tmp / out / "heldout.txt").read_text(encoding="utf-8")
        assert heldout == split_text(text, 0.1, pieces)[1]
        assert json.loads((in_tmp / out / "run.json").read_text())["config"]["train"]["val_pieces"] == pieces
    assert split_text(text, 0.1, 4) != split_text(text, 0.1, 1)
    assert split_text(text, 0.1, 20) == split_text(text, 0.1, 5)  # 10,000 characters: 5 pieces at most
    small = builtin_corpus()[:20_000]
    assert split_text(small, 0.05, 20) == split_text(small, 0.05, 1)  # 1,000 held out: the tail
