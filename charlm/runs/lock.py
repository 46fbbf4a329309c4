"""One trainer per run directory.

Two processes training into one run would interleave their checkpoints and metrics. ``RUN/.lock``
is held for as long as a trainer runs, through :mod:`filelock` (``flock`` on POSIX, ``msvcrt`` on
Windows): the operating system releases it on any exit, SIGKILL included, so a lock file left
behind by a dead process is noticed as stale and taken over. The file records the holder's pid and
host for the message a second trainer gets.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

import filelock

from charlm.errors import CheckpointError
from charlm.files import reason

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory (a context manager).

    ``stale_holder`` is set when the lock file named a process that no longer held it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.stale_holder: str | None = None
        self._lock = filelock.FileLock(self.path, timeout=0, thread_local=False, on_acquired=self._claim)

    def _claim(self, fd: int) -> None:
        """On taking the lock: note who the file named, then write our own name into it."""
        self.stale_holder = _holder(fd) or None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            CheckpointError: another live process holds it, or the file cannot be created.
        """
        try:
            self._lock.acquire()
        except filelock.Timeout:
            holder = _read_holder(self.path)
            raise CheckpointError(
                f"{self.path.parent} is in use by another charlm train ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"cannot lock {self.path}: {reason(exc)}") from exc
        return self

    def release(self) -> None:
        """Remove the file and drop the lock."""
        if not self._lock.is_locked:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # Windows keeps a held file: it goes with the release
            pass
        finally:
            self._lock.release(force=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who the open lock file says holds it ("" if it says nothing)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _read_holder(path: Path) -> str:
    """Who the lock file at ``path`` says holds it."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:200].strip() or "a process"
    except OSError:
        return "a process"
