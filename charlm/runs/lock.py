"""One trainer per run directory.

Two processes training into one run would interleave their checkpoints and metrics. ``RUN/.lock``
is held with ``flock`` for as long as a trainer runs; the kernel releases it on any exit, SIGKILL
included, so a lock file left behind by a dead process is noticed as stale and taken over. The file
records the holder's pid and host for the message a second trainer gets.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from charlm.errors import CheckpointError
from charlm.files import os_errors, reason

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory (a context manager).

    ``stale_holder`` is set when the lock file named a process that no longer held it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.stale_holder: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            CheckpointError: another live process holds it, or the file cannot be created.
        """
        while True:
            with os_errors(CheckpointError, f"cannot create {self.path}"):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    os.close(fd)
                    raise CheckpointError(f"cannot lock {self.path}: {reason(exc)}") from exc
                holder = _holder(fd)
                os.close(fd)
                raise CheckpointError(
                    f"{self.path.parent} is in use by another charlm train ({holder}); "
                    "wait for it to finish or stop it"
                ) from None
            try:  # the holder before us may have unlinked the file as we opened it: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale_holder = _holder(fd) or None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise CheckpointError(f"cannot write {self.path}: {reason(exc)}") from exc
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the file and drop the lock (unlink first, so no one locks a dying file)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who the lock file says holds it ("" if it says nothing)."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
