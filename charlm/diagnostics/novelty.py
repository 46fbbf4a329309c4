"""How much of a text is copied from a corpus: the longest span that occurs in it verbatim, and
the fraction of the text's 10-, 20- and 50-character windows that do (torch-rnn shipped such a
script: a small corpus is easy to memorise, and a sample that reads well may be a quotation).

One pass over the corpus, streamed in chunks, finds every window of the text that occurs in it,
for the three window sizes and for a ladder of longer lengths: each chunk's windows get 64-bit
polynomial hashes, computed for all positions at once with NumPy (the prefix sum of
``c[i] * B**-i`` modulo 2**64, B odd so invertible), and are looked up among the text's own window
hashes by binary search. A rung is hashed only where the rung below hit. The corpus text where the
highest rung hit is kept, and the longest span is found in it character by character, so it is
exact; the fractions rest on the hashes (a false match has odds of about 2**-64 per window).

Memory: a few arrays of one chunk; the corpus is never held whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

WINDOWS = (10, 20, 50)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_CHUNK = 1 << 20  # corpus characters hashed at once (arrays of a few MB each)


@dataclass(frozen=True)
class Novelty:
    """What of a text occurs verbatim in a corpus."""

    characters: int
    longest_copied: int  # characters of the longest span that occurs in the corpus
    longest_spans: list[str]  # the longest copied spans found (up to 5, longest first)
    copied_fraction: dict[int, float] = field(default_factory=dict)  # by window size: windows found


def _inverse(b: int) -> int:
    """b**-1 modulo 2**64 (b odd), by Newton's iteration."""
    x = b
    for _ in range(6):
        x = (x * (2 - b * x)) % (1 << 64)
    return x


_INV = np.uint64(_inverse(int(_BASE)))


def _codes(text: str) -> np.ndarray:
    """The code points of ``text`` as uint64 (n,)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64, (n,)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(out, dtype=np.uint64)


class _Hasher:
    """Window hashes of every position of a text, for any window length, in O(1) per window."""

    def __init__(self, codes: np.ndarray, inv: np.ndarray, pow_: np.ndarray) -> None:
        n = codes.size
        with np.errstate(over="ignore"):
            self.prefix = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum(codes * inv[:n], out=self.prefix[1:])  # sum of c[j] * B**-j
        self.pow, self.n = pow_, n

    def at(self, places: np.ndarray, k: int) -> np.ndarray:
        """Hashes of the windows of length k starting at ``places`` (each within the text)."""
        with np.errstate(over="ignore"):
            return (self.prefix[places + k] - self.prefix[places]) * self.pow[places + k - 1]

    def windows(self, k: int) -> np.ndarray:
        """Hashes (n - k + 1,) of the windows of length k: sum c[i+j] * B**(k-1-j)."""
        if k > self.n:
            return np.zeros(0, dtype=np.uint64)
        with np.errstate(over="ignore"):
            diff = self.prefix[k:] - self.prefix[: self.n - k + 1]
            return diff * self.pow[k - 1 : self.n]


Corpus = str | Callable[[], Iterable[str]]


def novelty(text: str, corpus: Corpus, windows: Sequence[int] = WINDOWS) -> Novelty:
    """Measure ``text`` against ``corpus``: its text, or a function that streams its text in pieces
    of any size (as :func:`charlm.data.corpus.text_chunks` does; memory then stays bounded
    whatever its size; a second pass is made only for a text with no window in the corpus).

    Returns:
        The longest copied span (characters) and the fraction of the text's windows of each size
        in ``windows`` that occur in the corpus (a text shorter than a window has no such windows).
    """
    n = len(text)
    first = min(windows)
    stream = (lambda: [corpus]) if isinstance(corpus, str) else corpus
    size = _CHUNK + n + 1  # a buffer: a chunk and the overlap carried from the one before
    inv, pow_ = _powers(_INV, size), _powers(_BASE, size)
    own = _Hasher(_codes(text), inv, pow_)
    hits, top = _scan(own, sorted({*windows, *_ladder(n, first)}), stream(), inv, pow_)
    fractions = {}
    for k in windows:
        hashes = own.windows(k)
        fractions[k] = float(_member(hashes, hits[k]).mean()) if hashes.size else 0.0
    if not top.snippets and n:  # no window of the text is in the corpus: how much shorter is?
        _, top = _scan(own, list(range(1, min(first, n + 1))), stream(), inv, pow_)
    longest, spans = _extend(text, top)
    return Novelty(n, longest, spans if longest >= first else [], fractions)


def _scan(
    own: _Hasher, rungs: list[int], chunks: Iterable[str], inv: np.ndarray, pow_: np.ndarray
) -> tuple[dict[int, np.ndarray], _Top]:
    """One pass over the corpus: the hashes of the text's windows found there, by rung, and the
    corpus text where the highest rung hit."""
    wanted = {k: np.unique(own.windows(k)) for k in rungs}  # sorted
    seen = {k: np.zeros(wanted[k].size, dtype=bool) for k in rungs}  # which of them the corpus has
    top = _Top()
    for buffer in _buffers(chunks, _CHUNK, own.n):
        hasher = _Hasher(_codes(buffer), inv, pow_)
        # Every copied window of a rung starts a copied window of the rung below: each rung is
        # hashed only where the one below hit, so the long rungs cost next to nothing.
        at = None  # every position, for the first rung (hashed in one sweep)
        highest = 0
        for k in rungs:
            if at is None:
                hashes = hasher.windows(k)
                places = np.arange(hashes.size)
            else:
                places = at[at + k <= hasher.n]
                hashes = hasher.at(places, k)
            hit = _member(hashes, wanted[k])
            if not hit.any():
                break
            seen[k][np.searchsorted(wanted[k], hashes[hit])] = True
            at, highest = places[hit], k
        if highest:
            top.offer(highest, [buffer[p : p + own.n] for p in at[: _Top.KEEP].tolist()])
    return {k: wanted[k][seen[k]] for k in rungs}, top


class _Top:
    """The corpus text at the places where the highest rung so far hit (up to KEEP of them): what
    the longest copied span is found in, exactly, once the pass is over."""

    KEEP = 1000

    def __init__(self) -> None:
        self.rung, self.snippets = 0, []

    def offer(self, rung: int, snippets: list[str]) -> None:
        if rung > self.rung:
            self.rung, self.snippets = rung, []
        if rung == self.rung:
            self.snippets = (self.snippets + snippets)[: self.KEEP]


def _buffers(chunks: Iterable[str], size: int, overlap: int) -> Iterator[str]:
    """The text of ``chunks`` re-cut into buffers of ``size`` new characters each, after the last
    ``overlap`` characters of the buffer before: every window of up to ``overlap + 1`` characters
    lies whole in some buffer, and no buffer is longer than ``size + overlap``."""
    carry, pending, length = "", [], 0
    for chunk in chunks:
        pending.append(chunk)
        length += len(chunk)
        if length < size:
            continue
        joined, i = "".join(pending), 0
        while len(joined) - i >= size:
            buffer = carry + joined[i : i + size]
            yield buffer
            carry = buffer[-overlap:] if overlap else ""
            i += size
        pending = [joined[i:]]
        length = len(pending[0])
    rest = "".join(pending)
    if rest:
        yield carry + rest


def _extend(text: str, top: _Top) -> tuple[int, list[str]]:
    """The longest span of ``text`` that a kept corpus snippet begins with: each snippet starts
    where the highest rung hit, so the text positions with the same window are compared with it
    character by character (exact; a hash collision compares short and is dropped)."""
    k = top.rung
    starts: dict[str, list[int]] = {}
    for s in range(len(text) - k + 1):
        starts.setdefault(text[s : s + k], []).append(s)
    spans: dict[str, int] = {}
    for snippet in top.snippets:
        for s in starts.get(snippet[:k], []):
            m = len(os.path.commonprefix([text[s:], snippet]))  # noqa: RUF071 (characters, not paths)
            spans[text[s : s + m]] = m
    if not spans:
        return 0, []
    ordered = sorted(spans, key=len, reverse=True)
    return len(ordered[0]), ordered[:5]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_set`` (sorted, unique): a binary search per value, so a
    chunk of millions against a text's thousands costs no sort of the chunk."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    index = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[index] == values


def _ladder(n: int, first: int) -> list[int]:
    """Window lengths to try for the longest span: from ``first`` up to ``n``, by factors of 1.25."""
    out, k = [], first
    while k <= n:
        out.append(k)
        k = max(k + 1, int(k * 1.25))
    return out
