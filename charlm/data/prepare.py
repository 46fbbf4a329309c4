"""Corpus -> tokenizer -> token ids: reading, splitting off the held-out text, training the
tokenizer and encoding through the token cache (see :mod:`charlm.data.batches` for the layout
training reads)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config import TokenizerConfig
from charlm.data import cache
from charlm.data.corpus import (
    Progress,
    chunks_outside,
    describe,
    expand_inputs,
    held_out_ranges,
    no_progress,
    read_ranges,
    scan,
    text_chunks,
)
from charlm.data.tokenizer import Tokenizer, train_tokenizer_from
from charlm.errors import CorpusError, TokenizerError


def read_corpus(inputs: Sequence[Path | str], encoding: str = "utf-8") -> str:
    """The text of one or more inputs (files, directories, glob patterns, compressed files: see
    :func:`charlm.data.corpus.expand_inputs`), joined with a newline where a file does not end in one
    (for texts that fit in memory: ``charlm eval --data``).

    Raises:
        CorpusError: as :func:`charlm.data.corpus.expand_inputs`, a file is missing, unreadable,
            damaged, binary, not in ``encoding``, or the whole text is empty or whitespace only.
    """
    text = "".join(text_chunks(expand_inputs(inputs), encoding))
    if not text.strip():
        raise CorpusError(f"corpus is {'empty' if not text else 'whitespace only'}: {describe(inputs)}")
    return text


def builtin_corpus() -> str:
    """CPython's own reference documentation (about 460 KB of English prose and code).

    It ships with every Python as ``pydoc_data.topics`` under the PSF licence, so the demo and the
    tests have a real corpus offline on any machine without the project shipping one.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"


def split_text(text: str, val_fraction: float, val_pieces: int = 1) -> tuple[str, str]:
    """Split into (train, validation) as a run does (see
    :func:`charlm.data.corpus.held_out_ranges`), on a text in memory: the validation text is its
    pieces joined, never trained on; one piece is the contiguous tail."""
    ranges = held_out_ranges(len(text), val_fraction, val_pieces, lambda rs: [text[a:b] for a, b in rs])
    bounds = [0, *(edge for piece in ranges for edge in piece), len(text)]
    train = "".join(text[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2))
    return train, "".join(text[a:b] for a, b in ranges)


@dataclass(frozen=True)
class Corpus:
    """A corpus ready for training: its tokenizer and the encoded train and validation parts."""

    tokenizer: Tokenizer
    train_ids: torch.Tensor  # (N,) uint16 or int32, memory-mapped from the token cache
    val_ids: torch.Tensor  # (M,)
    val_text: str
    sha256: str  # of the whole corpus text, so a resumed run can tell it is training on the same
    cached: bool  # the ids came from the cache (nothing was encoded)


def prepare_corpus(
    inputs: Sequence[Path | str],
    tokenizer_config: TokenizerConfig,
    val_fraction: float,
    val_pieces: int,
    min_train_tokens: int,
    encoding: str = "utf-8",
    status: Callable[[str], None] = lambda message: None,
    tokenizer: Tokenizer | None = None,
    progress: Progress = no_progress,
) -> Corpus:
    """Read the corpus, split off the validation text (``val_pieces`` pieces spread over it, see
    :func:`charlm.data.corpus.held_out_ranges`), train the tokenizer on the training part
    only (validation characters it never saw fall back to bytes) and encode both parts.

    The corpus streams through in pieces and its ids go to memory-mapped files in the token cache
    (:mod:`charlm.data.cache`), so memory stays bounded whatever its size, and a second run on the same
    text, split and tokenizer encodes nothing. The validation text is held in memory (it is
    ``val_fraction`` of the corpus). A resumed run passes its own ``tokenizer``, used as it is.
    ``inputs`` are files, directories, glob patterns and compressed files (see
    :func:`charlm.data.corpus.expand_inputs`), expanded once here, so every pass reads the same files.

    Raises:
        CorpusError: unusable, or too small for the split or for ``min_train_tokens``.
        TokenizerError: the tokenizer cannot be built.
    """
    paths = expand_inputs(inputs)
    info = scan(paths, encoding, progress)
    ranges = held_out_ranges(
        info.characters, val_fraction, val_pieces, lambda windows: read_ranges(paths, encoding, windows)
    )
    val_text = "".join(read_ranges(paths, encoding, ranges))
    train_chars = info.characters - len(val_text)
    if not val_text.strip() or info.first_text >= ranges[0][0]:
        raise CorpusError(
            f"corpus of {info.characters} characters is too small to split off "
            f"{{val_fraction}} {val_fraction}",
            fields=("val_fraction",),
        )

    def train_text() -> Iterator[str]:
        return chunks_outside(paths, encoding, ranges)

    if tokenizer is None:
        kind = tokenizer_config.kind.value
        name = cache.key(
            "tokenizer", info.sha256, *_split_key(val_fraction, val_pieces), kind, tokenizer_config.vocab_size
        )

        def build_tokenizer() -> bytes:
            status(f"training {kind} tokenizer on {train_chars:,} characters")
            return train_tokenizer_from(train_text, tokenizer_config).to_bytes()

        tokenizer = Tokenizer.from_bytes(cache.cached_bytes(name, build_tokenizer, _loads))

    def encode(directory: Path) -> dict[str, cache.TokenFile]:
        status(f"encoding {info.characters:,} characters into {cache.cache_dir()}")
        train = cache.IdWriter(directory / "train.ids", tokenizer.vocab_size)
        for ids in tokenizer.encode_stream(_reporting(train_text(), train_chars, progress)):
            train.write(ids)
        val = cache.IdWriter(directory / "val.ids", tokenizer.vocab_size)
        val.write(tokenizer.encode_array(val_text))
        return {"train": train.close(), "val": val.close()}

    entry = cache.key(
        "ids",
        info.sha256,
        *_split_key(val_fraction, val_pieces),
        hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
    )
    files, cached = cache.cached_ids(entry, encode)
    if cached:
        status(f"token ids from the cache ({files['train'].count + files['val'].count:,} tokens)")
    train_ids = torch.from_numpy(files["train"].open())
    if train_ids.numel() < min_train_tokens:
        raise CorpusError(
            f"corpus too small: {train_ids.numel()} training tokens, need at least {min_train_tokens} "
            "for the batch layout; use a larger corpus or a smaller {batch_size}",
            fields=("batch_size",),
        )
    val_ids = torch.from_numpy(files["val"].open())
    return Corpus(tokenizer, train_ids, val_ids, val_text, info.sha256, cached)


def _split_key(val_fraction: float, val_pieces: int) -> tuple[float | int, ...]:
    """What of the split a cache entry depends on (a tail's entries keep their earlier keys)."""
    return (val_fraction,) if val_pieces == 1 else (val_fraction, val_pieces)


def _loads(proto: bytes) -> bool:
    """Whether ``proto`` is a tokenizer (a cached one damaged by a crash is built again)."""
    try:
        Tokenizer.from_bytes(proto)
    except TokenizerError:
        return False
    return True


def _reporting(chunks: Iterator[str], total: int, progress: Progress) -> Iterator[str]:
    """Pass ``chunks`` through, reporting characters done out of ``total``."""
    done = 0
    for text in chunks:
        yield text
        done += len(text)
        progress("encoding corpus", done, total)


if __name__ == "__main__":  # `python -m charlm.data.prepare FILE` writes the built-in corpus (make demo)
    import sys

    target = Path(sys.argv[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(builtin_corpus(), encoding="utf-8")
