"""Corpus -> token ids -> parallel streams -> BPTT windows.

Teacher forcing with truncated backpropagation through time (TBPTT) sees the token stream as
``batch_size`` parallel streams, each a contiguous slice of the corpus, so a hidden state carried
from one window to the next continues the same text::

    corpus  a b c d e f g h i j k l m n o p q r s t u v w x      (24 tokens, batch_size 4)

    streams (T=6, B=4)       window t (bptt 2):  x = rows t..t+1, y = rows t+1..t+2
      a g m s
      b h n t                 x: a g m s   y: b h n t
      c i o u                    b h n t      c i o u
      d j p v
      e k q w
      f l r x

Row ``i`` of window ``k+1`` follows row ``i`` of window ``k`` in the text, so the final hidden state
of one window is the right initial state of the next (detached, to truncate the gradient).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config import TokenizerConfig
from charlm.errors import CorpusError
from charlm.tokenizer import Tokenizer, train_tokenizer


def read_corpus(paths: Sequence[Path], encoding: str = "utf-8") -> str:
    """The text of one or more files, joined with a newline where a file does not end in one.

    Raises:
        CorpusError: a file is missing, a directory, unreadable, binary, not in ``encoding``, or
            the whole text is empty or whitespace only.
    """
    if not paths:
        raise CorpusError("no corpus file given")
    texts = [_read_one(Path(p), encoding) for p in paths]
    text = "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))
    if not text.strip():
        raise CorpusError(
            f"corpus is {'empty' if not text else 'whitespace only'}: " + ", ".join(str(p) for p in paths)
        )
    return text


def _read_one(path: Path, encoding: str) -> str:
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"corpus is a directory, not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc.strerror or exc}") from exc
    nul = raw.find(b"\0")
    if nul >= 0:
        raise CorpusError(f"{path} looks binary (NUL byte at offset {nul}); give a text file")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not valid {encoding}: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
            " (if it is another encoding, say so with --encoding, e.g. --encoding latin-1)"
        ) from exc
    except LookupError as exc:
        raise CorpusError(f"unknown encoding {encoding!r}") from exc


def builtin_corpus() -> str:
    """CPython's own reference documentation (about 460 KB of English prose and code).

    It ships with every Python as ``pydoc_data.topics`` under the PSF licence, so the demo and the
    tests have a real corpus offline on any machine without the project shipping one.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split into (train, validation): the validation text is the contiguous tail, never trained on.

    The cut is moved back to the start of a line where one is near, so no word is split.
    """
    cut = int(len(text) * (1 - val_fraction))
    reach = min(1000, (len(text) - cut) // 2)  # never more than half the validation text again
    line_start = text.rfind("\n", cut - reach, cut)
    cut = line_start + 1 if line_start >= 0 else cut
    return text[:cut], text[cut:]


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay ``ids`` (N,) out as ``batch_size`` contiguous streams, shape (N // batch_size, batch_size).

    The last ``N % batch_size`` tokens are dropped (less than one per stream).
    """
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length).t().contiguous()  # (T, B)


def windows(streams: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (input, target) windows of ``streams`` (T, B), each (<=bptt, B), target = input
    shifted one step ahead in time, from window number ``start``."""
    for index in range(start, count_windows(streams, bptt)):
        yield window(streams, index, bptt)


def count_windows(streams: torch.Tensor, bptt: int) -> int:
    """How many BPTT windows one pass over ``streams`` (T, B) has."""
    return -(-(streams.size(0) - 1) // bptt)  # ceil


def window(streams: torch.Tensor, index: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window number ``index`` of ``streams`` (T, B): input rows index*bptt .. +bptt-1, (<=bptt, B),
    and the target rows one step later. Addressed by number, so a resumed run continues at the
    exact window it stopped at."""
    i = index * bptt
    n = min(bptt, streams.size(0) - 1 - i)
    return streams[i : i + n], streams[i + 1 : i + 1 + n]


@dataclass(frozen=True)
class EvalStreams:
    """A token stream laid out for evaluation: every token is scored exactly once.

    inputs/targets are (T, B); the stream is cut into B nearly equal contiguous pieces, the
    first input is the newline (a start-of-text context), and padding targets are -100 (ignored).
    """

    inputs: torch.Tensor  # (T, B)
    targets: torch.Tensor  # (T, B)
    tokens: int


def eval_streams(ids: torch.Tensor, start_id: int, streams: int) -> EvalStreams:
    """Lay out ``ids`` (N,) so that all N tokens are predicted, each from the tokens before it."""
    n = ids.numel()
    streams = max(1, min(streams, n))
    length = -(-n // streams)  # ceil
    inputs = torch.full((streams * length,), start_id, dtype=torch.long)
    targets = torch.full((streams * length,), -100, dtype=torch.long)
    inputs[1:n] = ids[: n - 1]
    targets[:n] = ids
    # (B, T) -> (T, B): stream b holds tokens b*length .. (b+1)*length-1
    return EvalStreams(
        inputs.view(streams, length).t().contiguous(), targets.view(streams, length).t().contiguous(), n
    )


@dataclass(frozen=True)
class Corpus:
    """A corpus ready for training: its tokenizer and the encoded train and validation parts."""

    tokenizer: Tokenizer
    train_ids: torch.Tensor  # (N,)
    val_ids: torch.Tensor  # (M,)
    val_text: str
    sha256: str  # of the whole corpus text, so a resumed run can tell it is training on the same


def prepare_corpus(
    paths: Sequence[Path],
    tokenizer_config: TokenizerConfig,
    val_fraction: float,
    min_train_tokens: int,
    encoding: str = "utf-8",
    status: Callable[[str], None] = lambda message: None,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """Read the corpus, split off the validation tail, train the tokenizer on the training part
    only (validation characters it never saw fall back to bytes) and encode both parts.

    A resumed run passes its own ``tokenizer``, which is used as it is.

    Raises:
        CorpusError: unusable, or too small for the split or for ``min_train_tokens``.
        TokenizerError: the tokenizer cannot be built.
    """
    text = read_corpus(paths, encoding)
    train_text, val_text = split_text(text, val_fraction)
    if not val_text.strip() or not train_text.strip():
        raise CorpusError(
            f"corpus of {len(text)} characters is too small to split off --val-fraction {val_fraction}"
        )
    if tokenizer is None:
        status(f"training {tokenizer_config.kind.value} tokenizer on {len(train_text):,} characters")
        tokenizer = train_tokenizer(train_text, tokenizer_config)
    status("encoding corpus")
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    if train_ids.numel() < min_train_tokens:
        raise CorpusError(
            f"corpus too small: {train_ids.numel()} training tokens, need at least {min_train_tokens} "
            "for the batch layout; use a larger corpus or a smaller --batch-size"
        )
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(tokenizer, train_ids, val_ids, val_text, digest)


if __name__ == "__main__":  # `python -m charlm.data FILE` writes the built-in corpus (make demo)
    import sys

    target = Path(sys.argv[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(builtin_corpus(), encoding="utf-8")
