"""Reading corpus files as a stream of text, so a corpus of any size passes through bounded memory.

Several files are one text, joined with a newline where a file does not end in one. Every reader
here checks what it reads (missing, a directory, unreadable, binary, not in the encoding) and
raises :class:`CorpusError` with the file and the byte offset. Characters are counted in code
points, as ``len(str)`` counts them, so a position here is an index into the joined text.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from charlm.errors import CorpusError

CHUNK_BYTES = 1 << 23  # read 8 MiB at a time
Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: how far a long pass over the corpus has come."""


def no_progress(task: str, done: int, total: int) -> None:
    """A :data:`Progress` that shows nothing."""


def text_chunks(
    paths: Sequence[Path], encoding: str = "utf-8", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """The joined text of ``paths``, in pieces of about ``chunk_bytes``.

    Raises:
        CorpusError: no file, or a file is missing, a directory, unreadable, binary (a NUL byte)
            or not valid in ``encoding``.
    """
    if not paths:
        raise CorpusError("no corpus file given")
    try:
        codecs.lookup(encoding)
    except LookupError as exc:
        raise CorpusError(f"unknown encoding {encoding!r}") from exc
    for index, path in enumerate(map(Path, paths)):
        last = ""
        for text in _file_chunks(path, encoding, chunk_bytes):
            last = text[-1]
            yield text
        if index < len(paths) - 1 and last != "\n":
            yield "\n"


def _file_chunks(path: Path, encoding: str, chunk_bytes: int) -> Iterator[str]:
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"corpus is a directory, not a file: {path}")
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0  # bytes of the file before ``raw``
    try:
        with path.open("rb") as file:
            while True:
                raw = file.read(chunk_bytes)
                nul = raw.find(b"\0")
                if nul >= 0:
                    raise CorpusError(
                        f"{path} looks binary (NUL byte at offset {offset + nul}); give a text file"
                    )
                pending = len(decoder.getstate()[0])  # bytes of a character split across reads
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    raise CorpusError(
                        f"{path} is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} at offset {at}"
                        " (if it is another encoding, say so with --encoding, e.g. --encoding latin-1)"
                    ) from exc
                if text:
                    yield text
                if not raw:
                    return
                offset += len(raw)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc.strerror or exc}") from exc


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
    total = sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
    digest, characters, first_text, done = hashlib.sha256(), 0, -1, 0
    for text in text_chunks(paths, encoding):
        data = text.encode("utf-8")
        digest.update(data)
        if first_text < 0 and text.strip():
            first_text = characters + len(text) - len(text.lstrip())
        characters += len(text)
        done += len(data)
        progress("reading corpus", min(done, total), total)
    if first_text < 0:
        raise CorpusError(
            f"corpus is {'empty' if not characters else 'whitespace only'}: " + ", ".join(map(str, paths))
        )
    return CorpusInfo(characters, first_text, digest.hexdigest())


def split_point(characters: int, val_fraction: float, text_before: Callable[[int, int], str]) -> int:
    """Where the validation tail starts: ``val_fraction`` from the end, moved back to the start
    of a line where one is within reach, so no word is split.

    ``text_before(start, end)`` returns the text between two positions (at most 1000 characters).
    """
    cut = int(characters * (1 - val_fraction))
    reach = min(1000, (characters - cut) // 2)  # never more than half the validation text again
    start = max(0, cut - reach)
    line_start = text_before(start, cut).rfind("\n")
    return start + line_start + 1 if line_start >= 0 else cut


def read_range(paths: Sequence[Path], encoding: str, start: int, end: int) -> str:
    """The text from character ``start`` to ``end`` of the joined corpus."""
    return "".join(range_chunks(paths, encoding, start, end))


def range_chunks(
    paths: Sequence[Path], encoding: str, start: int, end: int, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """The text from character ``start`` to ``end`` of the joined corpus, in pieces."""
    position = 0
    for text in text_chunks(paths, encoding, chunk_bytes):
        following = position + len(text)
        if following > start and position < end:
            yield text[max(start - position, 0) : end - position]
        if following >= end:
            return
        position = following
