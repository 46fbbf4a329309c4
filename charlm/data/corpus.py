"""Reading corpus files as a stream of text, so a corpus of any size passes through bounded memory.

A corpus is given as inputs: files, directories (their text files, recursively) and shell glob
patterns. :func:`expand_inputs` turns them into a list of files in a stable order, so the same
inputs give the same text (and checksum) on every machine and on every resume. Files named
``.gz``, ``.bz2`` or ``.xz`` are decompressed as they stream (never unpacked on disk).

Several files are one text, joined with a newline where a file does not end in one. Every reader
here checks what it reads (missing, unreadable, damaged compressed data, binary, not in the
encoding) and raises :class:`CorpusError` with the file and the byte offset. Characters are counted
in code points, as ``len(str)`` counts them, so a position here is an index into the joined text.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import lzma
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from charlm.errors import CorpusError
from charlm.files import reason

CHUNK_BYTES = 1 << 23  # read 8 MiB at a time
SNIFF_BYTES = 1 << 13  # a file in a directory with a NUL byte in its first 8 KiB is not a text file
# Compressed files are known by their name (what the user sees), and read by the stdlib. Each
# opener wraps an open file and leaves it open when closed (the caller closes it).
DECOMPRESSORS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": lambda raw: bz2.BZ2File(raw, "rb"),
    ".xz": lambda raw: lzma.LZMAFile(raw, "rb"),  # noqa: SIM115 - the reader closes it
}
# What the decompressors raise on damaged or cut-short data (besides bz2's and lzma's OSError).
_DAMAGED: tuple[type[Exception], ...] = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
_GLOB_MAGIC = frozenset("*?[")
Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: how far a long pass over the corpus has come."""


def no_progress(task: str, done: int, total: int) -> None:
    """A :data:`Progress` that shows nothing."""


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files a corpus is read from, in order: each input as it is given, a directory replaced
    by its text files and a glob pattern by what it matches.

    A directory gives every file below it (recursively) that is not hidden (no name below the
    directory starts with ``.``) and is text (no NUL byte in its first 8 KiB, decompressed), sorted
    component by component, so the order, the text and its checksum are the same on every machine.
    An input that does not exist as a path and holds ``*``, ``?`` or ``[`` is a glob pattern
    (``**`` spans directories), expanded here rather than by a shell, so a quoted pattern works and
    a resumed run expands the pattern it saved; its matches are sorted, directories expanded.

    Raises:
        CorpusError: no input, a directory with no text files, or a pattern that matches nothing
            (a file that does not exist is reported by the readers, which name it).
    """
    if not inputs:
        raise CorpusError("no corpus file given")
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files.extend(_directory_files(path))
        elif path.exists() or not _GLOB_MAGIC & set(str(given)):
            files.append(path)
        else:
            matches = sorted(glob.glob(str(given), recursive=True))
            if not matches:
                raise CorpusError(f"no file matches the pattern {given}")
            for match in map(Path, matches):
                files.extend(_directory_files(match) if match.is_dir() else [match])
    return files


def _directory_files(directory: Path) -> list[Path]:
    """The text files below ``directory``, in order (see :func:`expand_inputs`)."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # os.walk enters only these
        found.extend(Path(root, name) for name in names if not name.startswith("."))
    files = sorted((p for p in found if p.is_file() and _looks_like_text(p)), key=lambda p: p.parts)
    if not files:
        raise CorpusError(f"{directory} is a directory with no text files in it")
    return files


def _looks_like_text(path: Path) -> bool:
    """Whether the start of ``path`` (decompressed) holds no NUL byte. A file that cannot be read
    or decompressed counts as text, so that reading it says what is wrong rather than skipping it."""
    try:
        with path.open("rb") as disk, _reader(disk, path) as file:
            return b"\0" not in file.read(SNIFF_BYTES)
    except (OSError, *_DAMAGED):
        return True


def _reader(disk: IO[bytes], path: Path) -> IO[bytes]:
    """What reads ``disk`` (the open file ``path``): a decompressor if its name says so, else itself."""
    opener = DECOMPRESSORS.get(path.suffix.lower())
    return opener(disk) if opener else disk


def corpus_name(inputs: Sequence[str | os.PathLike[str]]) -> str:
    """A short name for a run on ``inputs`` (its default directory): the first input's name without
    its text and compression extensions (``books.txt.gz``: ``books``), the fixed directory a
    pattern starts with (``data/*.txt``: ``data``), or ``run``."""
    if not inputs:
        return "run"
    path = Path(inputs[0])
    if not path.exists():
        parts = path.parts
        fixed = next((i for i, part in enumerate(parts) if _GLOB_MAGIC & set(part)), len(parts))
        path = Path(*parts[:fixed])
    if path.suffix.lower() in DECOMPRESSORS:
        path = path.with_suffix("")
    if path.name in ("", ".."):
        path = path.resolve()
    return (path.name if path.is_dir() else path.stem) or "run"


def describe(paths: Sequence[str | os.PathLike[str]], most: int = 3) -> str:
    """``paths`` for a one-line message: the first few, then how many more."""
    shown = ", ".join(map(str, paths[:most]))
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def text_chunks(
    paths: Sequence[Path], encoding: str = "utf-8", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """The joined text of the files ``paths`` (see :func:`expand_inputs`), in pieces of about
    ``chunk_bytes`` (of decompressed text).

    Raises:
        CorpusError: no file, or a file is missing, a directory, unreadable, damaged (compressed),
            binary (a NUL byte) or not valid in ``encoding``.
    """
    for text, _ in _positioned_chunks(paths, encoding, chunk_bytes):
        yield text


def _positioned_chunks(paths: Sequence[Path], encoding: str, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """:func:`text_chunks`, each piece with the bytes of the files on disk read so far: what a
    progress bar over the files' sizes counts (a compressed file holds more text than bytes)."""
    if not paths:
        raise CorpusError("no corpus file given")
    try:
        codecs.lookup(encoding)
    except LookupError as exc:
        raise CorpusError(f"unknown encoding {encoding!r}") from exc
    done = 0
    for index, path in enumerate(map(Path, paths)):
        last, read = "", 0
        for text, read in _file_chunks(path, encoding, chunk_bytes):
            last = text[-1]
            yield text, done + read
        done += read
        if index < len(paths) - 1 and last != "\n":
            yield "\n", done


def _file_chunks(path: Path, encoding: str, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """The text of one file in pieces, each with the bytes of the file on disk read so far."""
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"corpus is a directory, not a file: {path}")
    compressed = path.suffix.lower() in DECOMPRESSORS
    where = "offset {} of its decompressed text" if compressed else "offset {}"
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0  # bytes of text (decompressed) before ``raw``
    try:
        with path.open("rb") as disk, _reader(disk, path) as file:
            while True:
                raw = file.read(chunk_bytes)
                nul = raw.find(b"\0")
                if nul >= 0:
                    raise CorpusError(
                        f"{path} looks binary (NUL byte at {where.format(offset + nul)}); give a text file"
                    )
                pending = len(decoder.getstate()[0])  # bytes of a character split across reads
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    at = where.format(offset - pending + exc.start)
                    raise CorpusError(
                        f"{path} is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} at {at}"
                        " (if it is another encoding, say so with {encoding}, e.g. {encoding} latin-1)",
                        fields=("encoding",),
                    ) from exc
                if text:
                    yield text, disk.tell()
                if not raw:
                    return
                offset += len(raw)
    except (OSError, *_DAMAGED) as exc:
        if compressed and not (isinstance(exc, OSError) and exc.errno):  # the data, not the disk
            kind = {".gz": "gzip", ".bz2": "bzip2"}.get(path.suffix.lower(), "xz")
            raise CorpusError(f"{path} is not intact {kind} data (damaged or cut short): {exc}") from exc
        raise CorpusError(f"cannot read corpus {path}: {reason(exc)}") from exc


@dataclass(frozen=True)
class CorpusInfo:
    """What one pass over a corpus learns: enough to split it and to key its cache."""

    characters: int
    first_text: int  # position of the first character that is not whitespace
    sha256: str  # of the joined text in UTF-8, whatever the files' encoding


def scan(paths: Sequence[Path], encoding: str = "utf-8", progress: Progress = no_progress) -> CorpusInfo:
    """Check the whole corpus, count it and take its checksum, in one streamed pass.

    Raises:
        CorpusError: as :func:`text_chunks`, or the text is empty or whitespace only.
    """
    total = sum(Path(p).stat().st_size for p in paths if Path(p).is_file())  # on disk
    digest, characters, first_text = hashlib.sha256(), 0, -1
    for text, done in _positioned_chunks(paths, encoding, CHUNK_BYTES):
        digest.update(text.encode("utf-8"))
        if first_text < 0 and text.strip():
            first_text = characters + len(text) - len(text.lstrip())
        characters += len(text)
        progress("reading corpus", min(done, total), total)
    if first_text < 0:
        raise CorpusError(f"corpus is {'empty' if not characters else 'whitespace only'}: {describe(paths)}")
    return CorpusInfo(characters, first_text, digest.hexdigest())


# The held-out text is spread over the corpus in up to ``val_pieces`` pieces, none shorter than
# this (a small corpus holds out fewer, longer pieces; one piece is the contiguous tail).
MIN_PIECE_CHARS = 2000
# How far back a cut may move to reach the start of a line.
LINE_REACH = 1000


def held_out_ranges(
    characters: int,
    val_fraction: float,
    pieces: int,
    read: Callable[[Sequence[tuple[int, int]]], list[str]],
    min_piece: int = MIN_PIECE_CHARS,
) -> list[tuple[int, int]]:
    """The (start, end) character ranges held out for validation, in order.

    The corpus is cut into ``pieces`` equal parts (fewer where a piece would hold under
    ``min_piece`` characters) and the middle ``val_fraction`` of each part is held out: validation
    measures every part of the corpus, and its start and its end are trained on (the end of a
    book, whose next chapter a user goes on to write, or the newest of a log). One piece is the
    corpus's tail, as runs written before pieces existed held out. Every cut moves back to the
    start of a line where one is within reach, so no word is split; each piece keeps at least half
    its length.

    ``read(ranges)`` returns the text of each (start, end) range, in one pass over the corpus.
    """
    pieces = max(1, min(pieces, int(characters * val_fraction) // min_piece))
    if pieces == 1:
        ranges = [(int(characters * (1 - val_fraction)), characters)]
    else:
        part = characters / pieces
        ranges = [
            (int(part * (k + (1 - val_fraction) / 2)), int(part * (k + (1 + val_fraction) / 2)))
            for k in range(pieces)
        ]
    # each cut moves back at most half its piece, so none is emptied; the corpus's end stays put
    windows = [
        (max(0, cut - min(LINE_REACH, (end - start) // 2)), cut)
        for start, end in ranges
        for cut in (start, end)
        if cut < characters
    ]
    moved = {}
    for (start, cut), text in zip(windows, read(windows), strict=True):
        line_start = text.rfind("\n")
        moved[cut] = start + line_start + 1 if line_start >= 0 else cut
    return [(moved.get(start, start), moved.get(end, end)) for start, end in ranges]


def read_ranges(
    paths: Sequence[Path], encoding: str, ranges: Sequence[tuple[int, int]], chunk_bytes: int = CHUNK_BYTES
) -> list[str]:
    """The text of each (start, end) character range of the joined corpus (ranges in order of
    their starts), in one pass."""
    found: list[list[str]] = [[] for _ in ranges]
    position, index = 0, 0
    for text in text_chunks(paths, encoding, chunk_bytes):
        following = position + len(text)
        for i in range(index, len(ranges)):
            start, end = ranges[i]
            if start >= following:
                break
            if end > position:
                found[i].append(text[max(start - position, 0) : end - position])
        while index < len(ranges) and ranges[index][1] <= following:
            index += 1
        if index == len(ranges):
            break
        position = following
    return ["".join(parts) for parts in found]


def chunks_outside(
    paths: Sequence[Path], encoding: str, ranges: Sequence[tuple[int, int]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """The joined corpus in pieces, without the (start, end) character ranges (in order, not
    overlapping): the training text of a split."""
    position, index = 0, 0
    for text in text_chunks(paths, encoding, chunk_bytes):
        following, at = position + len(text), position
        while index < len(ranges) and ranges[index][0] < following:
            start, end = ranges[index]
            if start > at:
                yield text[at - position : start - position]
            at = max(at, min(end, following))
            if end > following:
                break
            index += 1
        if at < following:
            yield text[at - position :]
        position = following
