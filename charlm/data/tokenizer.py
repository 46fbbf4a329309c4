"""SentencePiece tokenizer (char, BPE or unigram), exactly lossless on any UTF-8 text.

SentencePiece alone is nearly lossless once its normalisation is switched off: identity
normalisation, no dummy prefix, no whitespace folding, byte fallback for characters never seen in
training, and the newline as a piece of its own. One hole remains: it writes spaces as the meta
symbol U+2581 and cannot switch that off, so a literal U+2581 in the text would come back as a
space. We close it with a one-character escape (``ESC``) applied before encoding and undone after
decoding; :class:`StreamDecoder` handles pieces that only make sense together (escape pairs and
multi-byte characters split into byte pieces).
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from charlm.config import TokenizerConfig, TokenizerKind
from charlm.errors import TokenizerError

META = "\u2581"  # SentencePiece's space symbol
ESC = "\ue000"  # a private-use character, escaped itself, so escaping is a bijection
_UNESCAPE = re.compile(ESC + "([" + ESC + "_])")
NEWLINE = "\n"
_TRAIN_LINE_CHARS = 2000  # SentencePiece skips training "sentences" over 4192 bytes
_TRAIN_MAX_LINES = 2_000_000  # a sample this large gives the same vocabulary, faster ...
_TRAIN_MAX_CHARS = 20_000_000  # ... and fits in memory whatever the corpus
_ENCODE_CHUNK_CHARS = 1 << 20
_BYTE_PIECES = 256


def escape(text: str) -> str:
    """Make ``text`` safe for SentencePiece: ESC -> ESC ESC, U+2581 -> ESC '_'."""
    return text.replace(ESC, ESC + ESC).replace(META, ESC + "_")


def unescape(text: str) -> str:
    """Inverse of :func:`escape`; a lone ESC (which only a model's sample can produce) is kept."""
    return _UNESCAPE.sub(lambda m: ESC if m.group(1) == ESC else META, text)


class Tokenizer:
    """A trained SentencePiece model plus the escape layer; build with :func:`train_tokenizer`
    or :meth:`from_bytes`."""

    def __init__(self, model_proto: bytes) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, TypeError) as exc:
            raise TokenizerError(f"not a SentencePiece model: {exc}") from exc
        self._proto = model_proto
        self.newline_id: int = self._sp.piece_to_id(NEWLINE)
        self._byte_values: list[int | None] | None = None
        self._texts: dict[int, str] = {}  # decode_escaped of single ids

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Load a tokenizer saved with :meth:`to_bytes`."""
        return cls(model_proto)

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model (a protobuf, no code)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of token ids, byte-fallback pieces included."""
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``decode(encode(text)) == text`` for any string without surrogates."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as an array (int32)."""
        return np.concatenate([np.zeros(0, np.int32), *self.encode_stream([text])])

    def encode_stream(self, chunks: Iterable[str], batch: int = 4) -> Iterator[np.ndarray]:
        """Token ids of a text given in pieces of any size, as arrays (int32), in order: the same
        ids as :meth:`encode` of the whole text, in bounded memory.

        The text is re-cut into pieces of about 1M characters, each ending just after a newline
        where it has one: the newline is a piece of its own, so cutting there changes nothing, and
        SentencePiece encodes ``batch`` pieces at a time in parallel.
        """
        pieces: list[str] = []
        for piece in _cut_after_newlines(map(escape, chunks), _ENCODE_CHUNK_CHARS):
            pieces.append(piece)
            if len(pieces) == batch:
                yield from self._encode_batch(pieces)
                pieces = []
        yield from self._encode_batch(pieces)

    def _encode_batch(self, pieces: list[str]) -> Iterator[np.ndarray]:
        # A batch call starts a thread pool before any work, which costs more than encoding a short
        # prompt: one piece alone goes directly.
        if len(pieces) == 1:
            yield np.array(self._sp.encode(pieces[0]), dtype=np.int32)
        elif pieces:
            for ids in self._sp.encode(pieces, num_threads=0):
                yield np.array(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, exactly what :meth:`encode` was given."""
        return unescape(self._sp.decode(list(ids)))

    def piece(self, token_id: int) -> str:
        """The SentencePiece piece of one id (for display and tests)."""
        return str(self._sp.id_to_piece(token_id))

    @property
    def unk_id(self) -> int:
        """The unknown piece; byte fallback means no text ever encodes to it."""
        return int(self._sp.unk_id())

    def byte_value(self, token_id: int) -> int | None:
        """The byte of a byte-fallback piece (``<0xE2>`` -> 0xE2), None for any other piece."""
        return int(self.piece(token_id)[1:-1], 16) if self._sp.is_byte(token_id) else None

    def byte_values(self) -> list[int | None]:
        """:meth:`byte_value` of every id, computed once (streaming decoding asks per token)."""
        if self._byte_values is None:
            self._byte_values = [self.byte_value(i) for i in range(self.vocab_size)]
        return self._byte_values

    def decode_escaped(self, ids: list[int]) -> str:
        """SentencePiece's decoding without undoing the escape (for :class:`StreamDecoder`). One id's
        text is kept once decoded: a stream decodes one id a time, and a call into SentencePiece
        for each would cost a server as much as its whole batched step of many streams."""
        if len(ids) == 1:
            text = self._texts.get(ids[0])
            if text is None:
                text = self._texts[ids[0]] = str(self._sp.decode(ids))
            return text
        return str(self._sp.decode(ids))


class StreamDecoder:
    """Decodes ids one at a time for streaming output.

    Pieces are held back while they cannot yet be decoded on their own: byte-fallback pieces that
    begin but do not finish a UTF-8 character, and the first half of an escape pair. A malformed
    run (as a model may sample) is released after a few ids, as ``decode`` would show it.
    """

    _MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes = tokenizer.byte_values()
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now certain (possibly empty)."""
        self._pending.append(token_id)
        if len(self._pending) >= self._MAX_PENDING:
            return self.flush()
        if self._bytes[token_id] is not None and self._partial_character():
            return ""  # a character's first bytes: wait for the rest
        raw = self._tokenizer.decode_escaped(self._pending)
        if (len(raw) - len(raw.rstrip(ESC))) % 2 == 1:
            return ""  # half an escape pair
        self._pending = []
        return unescape(raw) if ESC in raw else raw

    def flush(self) -> str:
        """Release whatever is held back."""
        raw = self._tokenizer.decode_escaped(self._pending)
        self._pending = []
        return unescape(raw)

    def _partial_character(self) -> bool:
        """Do the trailing byte pieces begin a UTF-8 character without finishing it?"""
        tail = bytearray()
        for token_id in reversed(self._pending):
            value = self._bytes[token_id]
            if value is None:
                break
            tail.insert(0, value)
        try:
            tail.decode("utf-8")
        except UnicodeDecodeError as exc:
            return exc.reason == "unexpected end of data"
        return False


def _cut_after_newlines(chunks: Iterable[str], size: int) -> Iterator[str]:
    """Re-cut a stream of text into pieces of about ``size`` characters, each ending just after
    the last newline within its first ``size`` characters where there is one."""
    buffer = ""
    for text in chunks:
        buffer, start = buffer + text, 0
        while len(buffer) - start > size:
            newline = buffer.rfind(NEWLINE, start, start + size)
            end = newline + 1 if newline >= 0 else start + size
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    if buffer:
        yield buffer


def _segments(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of a text given in pieces (newlines removed: the newline is a user symbol), long
    lines cut into segments SentencePiece's trainer accepts."""
    size, partial = _TRAIN_LINE_CHARS, ""
    for text in chunks:
        lines = (partial + text).split(NEWLINE)
        partial = lines.pop()
        for line in lines:
            yield from (line[i : i + size] for i in range(0, max(len(line), 1), size))
        done = (len(partial) - 1) // size * size  # whole segments of an unfinished line, not its end
        if done > 0:
            yield from (partial[i : i + size] for i in range(0, done, size))
            partial = partial[done:]
    yield from (partial[i : i + size] for i in range(0, max(len(partial), 1), size))


def train_tokenizer(text: str, config: TokenizerConfig) -> Tokenizer:
    """Train a SentencePiece model of ``config.kind`` on ``text`` (see :func:`train_tokenizer_from`)."""
    return train_tokenizer_from(lambda: [text], config)


def train_tokenizer_from(chunks: Callable[[], Iterable[str]], config: TokenizerConfig) -> Tokenizer:
    """Train a SentencePiece model of ``config.kind`` on the text ``chunks()`` gives in pieces
    (called twice: once to count, once to train), so a corpus of any size streams through.

    The trainer sees evenly spread lines, at most ``_TRAIN_MAX_LINES`` of them and about
    ``_TRAIN_MAX_CHARS`` characters: a sample this large gives the same vocabulary, faster and in
    bounded memory; characters outside it still encode, as bytes.

    For ``char`` the vocabulary is every character of the sample (character coverage 1.0) plus
    256 byte pieces, whatever ``config.vocab_size`` says. For ``bpe`` and ``unigram`` the
    vocabulary is exactly ``config.vocab_size`` pieces, which must leave room for the byte pieces
    and every character, and not exceed what the text supports.

    Raises:
        TokenizerError: if SentencePiece refuses (for example a vocabulary the text cannot fill).
    """
    lines = characters = 0
    for segment in _segments(map(escape, chunks())):
        lines, characters = lines + 1, characters + len(segment)
    stride = max(-(-lines // _TRAIN_MAX_LINES), -(-characters // _TRAIN_MAX_CHARS), 1)
    sample = itertools.islice(_segments(map(escape, chunks())), 0, None, stride)
    is_char = config.kind is TokenizerKind.char
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample,
            model_writer=buffer,
            model_type=config.kind.value,
            vocab_size=1_000_000 if is_char else config.vocab_size,
            hard_vocab_limit=not is_char,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=False,
            user_defined_symbols=[NEWLINE],
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            max_sentence_length=4 * _TRAIN_LINE_CHARS + 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:
        # "INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high ..."
        message = str(exc).strip().split("] ", 1)[-1] or repr(exc)
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        fields: tuple[str, ...] = ()
        if small:  # SentencePiece's advice names its own option, which charlm has not
            message = (
                f"every character of the corpus and the byte pieces need {small[2]} pieces; use "
                f"{{vocab_size}} {small[2]} or more (or {{tokenizer}} char)"
            )
            fields = ("vocab_size", "tokenizer")
        raise TokenizerError(
            f"cannot build a {config.kind.value} vocabulary of {config.vocab_size} pieces "
            f"(byte fallback takes {_BYTE_PIECES} of them): {message}",
            fields=fields,
        ) from exc
    return Tokenizer(buffer.getvalue())
