"""The streamed corpus reader and the token cache: the same text, split and ids as reading it all
into memory, built once, reused while nothing changed, and safe with several builders at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import TokenizerConfig, TokenizerKind
from charlm.data import cache
from charlm.data.corpus import chunks_outside, held_out_ranges, read_ranges, scan, text_chunks
from charlm.data.prepare import prepare_corpus, split_text
from charlm.data.tokenizer import train_tokenizer
from charlm.errors import CorpusError

TEXT = st.text(alphabet=st.sampled_from("ab \n\té€😀\u2581\ue000"), max_size=400)


@given(
    parts=st.lists(TEXT, min_size=1, max_size=4),
    chunk=st.integers(1, 9),
    fraction=st.floats(0.01, 0.6),
    pieces=st.integers(1, 6),
)
@settings(max_examples=80, deadline=None)
def test_streamed_reading_and_split_match_the_text_in_memory(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str], chunk: int, fraction: float, pieces: int
) -> None:
    folder = tmp_path_factory.mktemp("files")
    paths = []
    for i, part in enumerate(parts):
        paths.append(folder / f"{i}.txt")
        paths[-1].write_bytes(part.encode("utf-8"))
    joined = "".join(p if p.endswith("\n") or i == len(parts) - 1 else p + "\n" for i, p in enumerate(parts))
    assert "".join(text_chunks(paths, chunk_bytes=chunk)) == joined  # multi-byte characters split too
    if not joined.strip():
        with pytest.raises(CorpusError, match=r"empty|whitespace"):
            scan(paths)
        return
    info = scan(paths)
    assert info.characters == len(joined)
    ranges = held_out_ranges(  # pieces of a character at least, so small texts are cut in several
        len(joined), fraction, pieces, lambda rs: [joined[a:b] for a, b in rs], min_piece=1
    )
    streamed = held_out_ranges(
        info.characters, fraction, pieces, lambda rs: read_ranges(paths, "utf-8", rs, chunk), min_piece=1
    )
    assert streamed == ranges
    edges = [edge for piece in ranges for edge in piece]
    assert edges == sorted(edges) and all(a < b for a, b in ranges)
    assert ranges[-1][1] == len(joined) or len(ranges) > 1  # one piece: the tail
    assert read_ranges(paths, "utf-8", ranges, chunk) == [joined[a:b] for a, b in ranges]
    train = "".join(chunks_outside(paths, "utf-8", ranges, chunk))
    bounds = [0, *edges, len(joined)]
    assert train == "".join(joined[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2))
    if len(ranges) == 1:  # the tail runs written before pieces existed held out
        assert split_text(joined, fraction) == (joined[: ranges[0][0]], joined[ranges[0][0] :])


def test_reading_errors_name_the_byte_offset_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes("é".encode() * 10 + b"\xff" + b"x" * 10)
    with pytest.raises(CorpusError, match="byte 0xff at offset 20"):
        list(text_chunks([path], chunk_bytes=3))
    path.write_bytes(b"x" * 25 + b"\0")
    with pytest.raises(CorpusError, match="NUL byte at offset 25"):
        list(text_chunks([path], chunk_bytes=4))
    path.write_bytes(b"abc\xe2\x82")  # a character cut off at the end of the file
    with pytest.raises(CorpusError, match="offset 3"):
        list(text_chunks([path], chunk_bytes=2))


@given(pieces=st.lists(TEXT, max_size=8))
@settings(max_examples=40, deadline=None)
def test_encoding_a_stream_gives_the_ids_of_the_whole_text(pieces: list[str], corpus_text: str) -> None:
    tokenizer = _tokenizer(corpus_text)
    streamed = np.concatenate([np.zeros(0, np.int32), *tokenizer.encode_stream(pieces)])
    assert streamed.tolist() == tokenizer.encode("".join(pieces))


def _tokenizer(text: str, _cache: dict = {}):  # noqa: B006 - one tokenizer for the whole module
    if "tok" not in _cache:
        _cache["tok"] = train_tokenizer(text, TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=400))
    return _cache["tok"]


def _prepare(corpus: Path, kind: TokenizerKind = TokenizerKind.char, statuses: list | None = None):
    return prepare_corpus(
        [corpus],
        TokenizerConfig(kind=kind, vocab_size=400),
        0.1,
        1,
        16,
        status=(statuses if statuses is not None else []).append,
    )


def test_the_ids_are_cached_memory_mapped_and_equal_to_encoding_in_memory(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    first = _prepare(corpus)
    assert not first.cached
    text = corpus.read_text()
    train_text, val_text = split_text(text, 0.1)
    assert first.train_ids.dtype == torch.uint16  # the smallest type that holds the vocabulary
    assert first.train_ids.long().tolist() == first.tokenizer.encode(train_text)
    assert first.val_ids.long().tolist() == first.tokenizer.encode(val_text) and first.val_text == val_text
    files = list((tmp_path / "cache" / "ids").glob("*/train.ids"))
    assert len(files) == 1 and files[0].stat().st_size == 2 * first.train_ids.numel()

    statuses: list[str] = []
    second = _prepare(corpus, statuses=statuses)
    assert second.cached and any("from the cache" in s for s in statuses)
    assert not any("training" in s or "encoding" in s for s in statuses)  # nothing was redone
    assert torch.equal(second.train_ids, first.train_ids)
    assert second.tokenizer.to_bytes() == first.tokenizer.to_bytes()

    assert not _prepare(corpus, TokenizerKind.bpe).cached  # another tokenizer: another entry
    corpus.write_text(text + "one more line\n")
    changed = _prepare(corpus)
    assert not changed.cached and changed.sha256 != first.sha256  # the content is the key


def test_a_damaged_entry_is_built_again(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    expected = _prepare(corpus).train_ids.clone()  # a copy: reading a truncated mapping is SIGBUS
    (file,) = (tmp_path / "cache" / "ids").glob("*/train.ids")
    with file.open("r+b") as f:
        f.truncate(10)  # a disk that filled up, say
    again = _prepare(corpus)
    assert not again.cached and torch.equal(again.train_ids, expected)


def _build_in_another_process(corpus: str, cache_dir: str) -> tuple[bool, list[int]]:
    import os

    os.environ["CHARLM_CACHE_DIR"] = cache_dir
    prepared = _prepare(Path(corpus))
    return prepared.cached, prepared.train_ids[:50].tolist()


def test_processes_starting_at_once_build_the_entry_once(corpus: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        results = pool.starmap(_build_in_another_process, [(str(corpus), str(tmp_path / "cache"))] * 3)
    assert sorted(cached for cached, _ in results) == [False, True, True]  # one built, two waited
    assert all(ids == results[0][1] for _, ids in results)
    assert not list((tmp_path / "cache" / "ids").glob("*.tmp-*"))  # no half-built entry left


def test_an_unwritable_cache_is_a_clear_error(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CorpusError, match="CHARLM_CACHE_DIR"):
        _prepare(corpus)


def test_cache_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "a"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CHARLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "charlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == Path.home() / ".cache" / "charlm"
