"""How much of a text is copied from a corpus: the longest span that occurs in it verbatim, and
the fraction of the text's 10-, 20- and 50-character windows that do (torch-rnn shipped such a
script: a small corpus is easy to memorise, and a sample that reads well may be a quotation).

One pass over the corpus, in chunks, finds every window of the text that occurs in it, for the
three window sizes and for a ladder of longer lengths: each chunk's windows get 64-bit polynomial
hashes, computed for all positions at once with NumPy (the prefix sum of ``c[i] * B**-i`` modulo
2**64, B odd so invertible), and are looked up among the text's own window hashes. The longest
span is then pinned down between two rungs of the ladder with exact substring searches, so it is
exact; the fractions rest on the hashes (a false match has odds of about 2**-64 per window).

Memory: the corpus text (for the exact searches) and a few arrays of one chunk: 100 MB of corpus
fit in well under 1 GB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

WINDOWS = (10, 20, 50)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64
_CHUNK = 1 << 22  # corpus characters hashed at once


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


def novelty(text: str, corpus: Sequence[str] | str, windows: Sequence[int] = WINDOWS) -> Novelty:
    """Measure ``text`` against ``corpus`` (its text, or the pieces it streams in: a piece of the
    corpus is a separate text, a window never spans two).

    Returns:
        The longest copied span (characters) and the fraction of the text's windows of each size
        in ``windows`` that occur in the corpus (a text shorter than a window has no such windows).
    """
    pieces = [corpus] if isinstance(corpus, str) else list(corpus)
    n = len(text)
    first = min(windows)
    rungs = sorted({*windows, *_ladder(n, first)})
    size = _CHUNK + n + 1  # a chunk and its overlap
    inv, pow_ = _powers(_INV, size), _powers(_BASE, size)
    own = _Hasher(_codes(text), inv, pow_)
    wanted = {k: np.unique(own.windows(k)) for k in rungs}  # sorted
    found: dict[int, list[np.ndarray]] = {k: [] for k in rungs}
    for piece in pieces:
        for start in range(0, len(piece), _CHUNK):
            chunk = piece[start : start + _CHUNK + n]  # overlaps the next by a window of any length
            hasher = _Hasher(_codes(chunk), inv, pow_)
            # Every copied window of any length starts with a copied window of the shortest: the
            # longer ones are hashed only where the shortest hit.
            at = np.flatnonzero(_member(hasher.windows(first), wanted[first]))
            for k in rungs:
                places = at[at + k <= hasher.n]
                hashes = hasher.at(places, k)
                found[k].append(hashes[_member(hashes, wanted[k])])
    hits = {k: np.unique(np.concatenate(v)) if v else np.zeros(0, np.uint64) for k, v in found.items()}
    fractions = {}
    for k in windows:
        hashes = own.windows(k)
        fractions[k] = float(_member(hashes, hits[k]).mean()) if hashes.size else 0.0
    longest, spans = _longest(text, pieces, own, rungs, hits)
    return Novelty(n, longest, spans, fractions)


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


def _longest(
    text: str, pieces: list[str], own: _Hasher, rungs: list[int], hits: dict[int, np.ndarray]
) -> tuple[int, list[str]]:
    """The exact longest span of ``text`` in the corpus. The longest rung with a hit bounds it
    below and the next rung above; the text positions whose window hit at that rung are extended
    by binary search with exact substring tests (a position that cannot beat the best so far costs
    one test). Below the shortest rung, the spans are tried directly (short texts, or no copy)."""
    found_rungs = [k for k in rungs if hits[k].size]
    if not found_rungs:
        best = 0
        for m in range(1, min(rungs[0] - 1, len(text)) + 1):
            if not any(_in(text[s : s + m], pieces) for s in range(len(text) - m + 1)):
                break
            best = m
        return best, []
    lo = found_rungs[-1]
    above = [k for k in rungs if k > lo]
    hi = above[0] if above else len(text) + 1  # no window this long occurs
    starts = np.flatnonzero(_member(own.windows(lo), hits[lo])).tolist()
    best, spans = 0, {}
    for s in starts:
        if s + max(best, lo) > len(text) or not _in(text[s : s + max(best, lo)], pieces):
            continue  # a hash collision, or it cannot beat the best
        a, b = max(best, lo), min(hi, len(text) - s + 1)  # a occurs, b does not (or is past the end)
        while b - a > 1:
            mid = (a + b) // 2
            a, b = (mid, b) if _in(text[s : s + mid], pieces) else (a, mid)
        spans[text[s : s + a]] = a
        best = max(best, a)
    ordered = sorted(spans, key=len, reverse=True)[:5]
    return best, ordered


def _in(span: str, pieces: list[str]) -> bool:
    return any(span in piece for piece in pieces)
