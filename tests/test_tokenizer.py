"""The tokenizer is exactly lossless on any text, for every SentencePiece model type."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import TokenizerConfig, TokenizerKind
from charlm.data.tokenizer import ESC, META, StreamDecoder, Tokenizer, escape, train_tokenizer, unescape
from charlm.errors import TokenizerError

# Any text a UTF-8 file can hold (surrogates cannot be encoded), biased towards the hard parts:
# whitespace runs, newlines, the escape characters, emoji and characters never seen in training.
HARD = [" ", "  ", "\n", "\r\n", "\t", META, ESC, ESC + "_", "😀", "é\u0301", "\x00", "\ufeff", "中文"]
texts = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20), st.sampled_from(HARD)),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module", params=list(TokenizerKind))
def tokenizer(request: pytest.FixtureRequest, corpus_text: str) -> Tokenizer:
    return train_tokenizer(corpus_text, TokenizerConfig(kind=request.param, vocab_size=500))


@given(texts)
@settings(max_examples=200, deadline=None)
def test_escape_is_a_bijection(text: str) -> None:
    assert META not in escape(text)
    assert unescape(escape(text)) == text


@given(text=texts)
@settings(max_examples=300, deadline=None)
def test_decode_encode_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(text=texts)
@settings(max_examples=150, deadline=None)
def test_streaming_decode_matches_whole_decode(tokenizer: Tokenizer, text: str) -> None:
    decoder = StreamDecoder(tokenizer)
    streamed = "".join(decoder.push(i) for i in tokenizer.encode(text)) + decoder.flush()
    assert streamed == text


def test_unseen_characters_use_byte_fallback_not_unk(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("☃")
    assert 0 not in ids  # unk
    assert [tokenizer.piece(i) for i in ids] == ["<0xE2>", "<0x98>", "<0x83>"]


def test_newline_is_one_piece(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("\n") == [tokenizer.newline_id]


def test_long_text_is_encoded_in_chunks_identically(tokenizer: Tokenizer, corpus_text: str) -> None:
    from charlm.data import tokenizer as module

    whole = tokenizer.encode(corpus_text)
    old = module._ENCODE_CHUNK_CHARS
    module._ENCODE_CHUNK_CHARS = 1000
    try:
        assert tokenizer.encode(corpus_text) == whole
    finally:
        module._ENCODE_CHUNK_CHARS = old


def test_serialisation_round_trip(tokenizer: Tokenizer) -> None:
    again = Tokenizer.from_bytes(tokenizer.to_bytes())
    assert again.encode("hello  world\n") == tokenizer.encode("hello  world\n")


def test_char_vocabulary_is_every_character_plus_bytes(corpus_text: str) -> None:
    tok = train_tokenizer(corpus_text, TokenizerConfig(kind=TokenizerKind.char))
    # every distinct character except the newline (a user symbol), + newline, unk, 256 bytes
    assert tok.vocab_size == len(set(corpus_text) - {"\n"}) + 1 + 1 + 256
    assert len(tok.encode("Hello")) == 5


@pytest.mark.parametrize(
    "kind,size,words",
    [
        ("bpe", 100_000, "too high"),
        ("unigram", 100, r"need \d+ pieces; use vocab_size \d+ or more"),
    ],
)
def test_impossible_vocabulary_is_a_clear_error(corpus_text: str, kind: str, size: int, words: str) -> None:
    with pytest.raises(TokenizerError, match=words):
        train_tokenizer(corpus_text, TokenizerConfig(kind=TokenizerKind(kind), vocab_size=size))


def test_streaming_releases_a_real_replacement_character_at_once(tokenizer: Tokenizer) -> None:
    text = "a" + "\ufffd" * 9 + "é😀b"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    first = len(tokenizer.encode("a\ufffd"))
    assert "".join(decoder.push(i) for i in ids[:first]) == "a\ufffd"  # nothing held back
    assert "".join(decoder.push(i) for i in ids[first:]) + decoder.flush() == text[2:]
