"""The on-disk cache of encoded corpora: token ids in memory-mapped files, keyed by content.

Encoding a large corpus takes minutes; training reads its ids many times. An entry holds the ids
of one corpus text, split one way, encoded by one tokenizer, so it is reused exactly while all
three are unchanged and never when any of them changes (the key is their checksums, not file
names or dates). Trained tokenizers are cached the same way, keyed by the corpus, the split and
the tokenizer options.

The cache lives in ``$CHARLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/charlm``, else
``~/.cache/charlm``; deleting it at any time is safe. Several processes building the same entry
at once (the ranks of a distributed run on one host) take turns on a lock file: the first builds it
in a temporary directory and renames it into place, the others then find it complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import filelock
import numpy as np

from charlm.errors import CorpusError
from charlm.files import atomic_write, os_errors

FORMAT = 1  # bump when the layout or the meaning of an entry changes
META_FILE = "meta.json"


def cache_dir() -> Path:
    """Where the cache lives (see the module docstring)."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charlm"


def key(*parts: object) -> str:
    """A cache key: the checksum of ``parts`` and of the cache format."""
    return hashlib.sha256(repr((FORMAT, *parts)).encode()).hexdigest()[:32]


_WRITABLE = "(set CHARLM_CACHE_DIR to a writable directory)"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``.lock (blocking) while building ``path``."""
    where = f"cannot write the token cache in {path.parent}"
    with os_errors(CorpusError, where, _WRITABLE):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(path.with_name(path.name + ".lock"), thread_local=False)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _unique() -> str:
    """A name no other process uses, on this host or another sharing the cache."""
    return f"{socket.gethostname()}-{os.getpid()}"


def cached_bytes(name: str, build: Callable[[], bytes], valid: Callable[[bytes], bool]) -> bytes:
    """The bytes cached under ``name``, built (once, under a lock) if missing or not ``valid``."""
    path = cache_dir() / "tokenizers" / name
    if path.is_file() and valid(data := path.read_bytes()):
        return data
    with _locked(path):
        if path.is_file() and valid(data := path.read_bytes()):  # built while this one waited
            return data
        data = build()
        with os_errors(CorpusError, f"cannot write the token cache in {path.parent}", _WRITABLE):
            atomic_write(path, data, tag=_unique())
    return data


@dataclass(frozen=True)
class TokenFile:
    """Token ids written by :class:`IdWriter`: the path and how many ids it holds."""

    path: Path
    count: int
    dtype: str

    def open(self) -> np.ndarray:
        """The ids, memory-mapped (pages are read from disk as they are used), shape (count,).

        Copy-on-write, so the array is writable as torch wants without ever changing the file."""
        if self.count == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="c", shape=(self.count,))


class IdWriter:
    """Appends arrays of ids to a file in the smallest dtype that holds the vocabulary."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = path
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self.count = 0
        self._file = path.open("wb")

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (n,)."""
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.count += ids.size

    def close(self) -> TokenFile:
        """Finish the file (flushed to disk) and describe it."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return TokenFile(self.path, self.count, self.dtype.name)


def cached_ids(name: str, build: Callable[[Path], dict[str, TokenFile]]) -> tuple[dict[str, TokenFile], bool]:
    """The token files of entry ``name``, built (once, under a lock) if missing or damaged.

    ``build(directory)`` writes the files into ``directory`` and returns them by part name.

    Returns:
        The files by part name, and whether they came from the cache (False: built now).
    """
    path = cache_dir() / "ids" / name
    found = _read_entry(path)
    if found is not None:
        return found, True
    with _locked(path):
        found = _read_entry(path)
        if found is not None:
            return found, True
        shutil.rmtree(path, ignore_errors=True)  # damaged: build it again
        temporary = path.with_name(f"{name}.tmp-{_unique()}")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            temporary.mkdir(parents=True)
            files = build(temporary)
            meta = {
                part: {"count": f.count, "dtype": f.dtype, "file": f.path.name} for part, f in files.items()
            }
            (temporary / META_FILE).write_text(json.dumps(meta))
            os.replace(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    entry = _read_entry(path)
    assert entry is not None
    return entry, False


def _read_entry(path: Path) -> dict[str, TokenFile] | None:
    """An entry's files if it is complete and its files have the sizes its meta says, else None."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        files = {
            part: TokenFile(path / m["file"], int(m["count"]), str(m["dtype"])) for part, m in meta.items()
        }
        for f in files.values():
            if f.path.stat().st_size != f.count * np.dtype(f.dtype).itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files
