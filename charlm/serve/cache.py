"""The states of recent prompts, so that a prompt which extends one reads only its new tokens.

A recurrent model's state after a text is a few kilobytes however long the text, and it is all the
model keeps of it: two prompts that start with the same tokens reach the same state after them.
So the server keeps the states it reached (after a prompt, and after a reply: the next turn of a
conversation is the last prompt, the reply and a new message), least recently used out beyond a
size in bytes. A prompt is looked up by its token ids, never its text: with a subword tokenizer a
text's prefix is not always a prefix of its tokens ("th" + "e" is not "the"), and a state is the
state after its tokens; with a character tokenizer the two are the same.

Looking a prompt up checks each distinct length of the entries, longest first, by the bytes of its
ids: a dictionary look-up a length, so its cost grows with the lengths kept, not with the entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from charlm.model.network import Hidden

# What an entry costs beyond its arrays (the dictionary's slot, the objects): a guess, so that a
# cache of tiny states is bounded too.
ENTRY_OVERHEAD = 256


@dataclass(frozen=True)
class Entry:
    """The model's state after the token ids ``key`` (int32 bytes, the start-of-text newline
    first) and its next-token scores, where known. Never changed: a row copies what it takes."""

    key: bytes
    hidden: Hidden  # (layers, 1, S), a pair for the LSTM
    logits: torch.Tensor | None  # (V,) after the ids; None where not known (a reply's last token unread)
    size: int  # bytes it counts against the cache

    @property
    def tokens(self) -> int:
        """How many ids it has read."""
        return len(self.key) // 4


def _key(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype=np.int32).tobytes()


def _nbytes(hidden: Hidden) -> int:
    parts = hidden if isinstance(hidden, tuple) else (hidden,)
    return sum(part.numel() * part.element_size() for part in parts)


class StateCache:
    """States after token ids, least recently used out beyond ``max_bytes`` (0: keeps none).
    Safe to use from several threads (the engine's and its prompt thread)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0  # tokens not read again, over all hits
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # entries by their length in tokens
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> Entry | None:
        """The entry of the longest prefix of ``ids`` that is kept (``ids`` whole only where its
        scores are known: a row needs them to pick), or None."""
        if not self.max_bytes:
            return None
        key = _key(ids)
        with self._lock:
            for length in sorted(self._lengths, reverse=True):
                if length > len(ids):
                    continue
                entry = self._entries.get(key[: 4 * length])
                if entry is not None and (length < len(ids) or entry.logits is not None):
                    self._entries.move_to_end(entry.key)
                    self.hits += 1
                    self.tokens_saved += length
                    return entry
            self.misses += 1
        return None

    def put(self, ids: Sequence[int], hidden: Hidden, logits: torch.Tensor | None) -> None:
        """Keep the state ``hidden`` after ``ids`` (and the scores ``logits`` after them, where
        known); the caller hands them over and does not change them. An entry of ids already
        kept is replaced, unless it knows scores that this one does not."""
        if not self.max_bytes:
            return
        key = _key(ids)
        size = len(key) + _nbytes(hidden) + (_nbytes(logits) if logits is not None else 0) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if old.logits is not None and logits is None:
                    self._entries.move_to_end(key)
                    return
                self._drop(key)
            self._entries[key] = Entry(key, hidden, logits, size)
            self._lengths[len(key) // 4] = self._lengths.get(len(key) // 4, 0) + 1
            self.bytes += size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        length = entry.tokens
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]
