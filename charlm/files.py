"""The two file mechanisms every module shares: writing a file whole or not at all, and turning an
``OSError`` into a :class:`CharlmError` of one line ("cannot write X: No space left on device")."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charlm.errors import CharlmError


def reason(exc: BaseException) -> str:
    """What went wrong, as a user reads it: the OS's words ("Permission denied"), not its tuple."""
    return str(exc.strerror) if isinstance(exc, OSError) and exc.strerror else str(exc)


@contextmanager
def os_errors(error: type[CharlmError], doing: str, hint: str = "") -> Iterator[None]:
    """Raise ``error("DOING: REASON HINT")`` for an ``OSError`` in the block.

    Example: ``with os_errors(CheckpointError, f"cannot write {file}"): ...``
    """
    try:
        yield
    except OSError as exc:
        raise error(f"{doing}: {reason(exc)}{' ' + hint if hint else ''}") from exc


def write_synced(file: Path, data: bytes) -> None:
    """Write ``data`` to ``file`` and make it durable (fsync) before returning."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(file: Path, data: bytes, tag: str = "") -> None:
    """Replace ``file`` with ``data`` whole: written and synced beside it, then renamed over it, so
    a crash at any moment leaves the old file or the new one, never a part. ``tag`` makes the
    temporary name unique where several processes may write the same file.

    Raises:
        OSError: it cannot be written (the old file, if any, is left as it was).
    """
    tmp = file.with_name(f".{file.name}.tmp{'-' + tag if tag else ''}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
