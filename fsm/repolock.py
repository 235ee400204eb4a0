"""Who may run an engine on a store directory, with OS locks that die with their process.

The lock is a `flock` on the store directory itself, taken through its own descriptor. A
directory cannot be unlinked and silently re-created while its store is in use, unlike a lock
file, and the kernel drops the lock when the process dies (even of kill -9), so a stale lock
never needs deleting by hand. `engine.lock` only says which pid holds it, for messages.

* An engine holds the lock exclusively for its whole life.
* A CLI command that writes while no engine runs (an offline pledge) holds it *shared* for the
  length of its write: an engine cannot start in the middle, and a starting engine tells such
  a writer (whose shared lock lets a shared probe through) from another engine (whose
  exclusive one does not), and waits a few seconds for it instead of failing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import StoreLockedError

log = logging.getLogger("sectorfsm.fsm.store")

#: Seconds a starting engine waits for CLI writers to finish.
ENGINE_WAIT = 5.0
PID_FILE = "engine.lock"
_POLL = 0.05


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _try(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RepoLock:
    """The engine lock of one store directory (re-entrant within this process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._users = 0
        self._writer_fds: list[int] = []

    @property
    def held(self) -> bool:
        """True while this process holds the engine lock."""
        return self._fd is not None

    def acquire(self, wait: float = ENGINE_WAIT) -> None:
        """Take the engine lock; `StoreLockedError` if another engine holds it."""
        if self._fd is not None:
            self._users += 1
            return
        fd = _open_dir(self.path)
        deadline = time.monotonic() + wait
        waiting = False
        try:
            while not _try(fd, fcntl.LOCK_EX):
                if self.engine_elsewhere():
                    raise StoreLockedError(
                        f"another engine (pid {self.holder()}) is already running on "
                        f"{self.path}; stop it first, or use the CLI, which works alongside it"
                    )
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"a `sectors` command has been writing to {self.path} for {wait:g}s; "
                        "start the engine again once it has finished"
                    )
                if not waiting:
                    waiting = True
                    log.warning(
                        "%s: waiting up to %gs for a `sectors` command that is writing to it",
                        self.path,
                        wait,
                    )
                time.sleep(_POLL)  # a CLI writer holds it for one write: poll until it is done
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._users = 1
        try:
            pid_fd = os.open(self.path / PID_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(pid_fd, str(os.getpid()).encode())
            finally:
                os.close(pid_fd)
        except OSError:
            pass  # the pid is only information for messages; the lock is what counts

    def release(self) -> None:
        """Release one claim taken with `acquire`."""
        if self._fd is None:
            return
        self._users -= 1
        if self._users > 0:
            return
        with suppress(OSError):
            os.truncate(self.path / PID_FILE, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def engine_elsewhere(self) -> bool:
        """True if another engine (another process, or another descriptor here) holds it."""
        if self._fd is not None:
            return False
        try:
            fd = _open_dir(self.path)
        except OSError:
            return False
        try:
            if not _try(fd, fcntl.LOCK_SH):
                return True  # only an engine takes it exclusively
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def acquire_writer(self) -> bool:
        """Hold off engines for a CLI write; False (holding nothing) if an engine runs."""
        if self._fd is not None:
            return False  # this process is the engine
        fd = _open_dir(self.path)
        if not _try(fd, fcntl.LOCK_SH):
            os.close(fd)
            return False
        self._writer_fds.append(fd)
        return True

    def release_writer(self) -> None:
        """Release the newest claim taken with `acquire_writer`."""
        if self._writer_fds:
            os.close(self._writer_fds.pop())  # (closing the descriptor drops its lock)

    def release_all_writers(self) -> None:
        """Release every `acquire_writer` claim (the store is closing)."""
        while self._writer_fds:
            self.release_writer()

    @contextmanager
    def offline_writer(self) -> Iterator[bool]:
        """`acquire_writer` for the length of a `with` block; yields its answer."""
        held = self.acquire_writer()
        try:
            yield held
        finally:
            if held:
                self.release_writer()

    def holder(self) -> str:
        """The pid of the engine holding the lock, as far as can be told."""
        try:
            text = (self.path / PID_FILE).read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text or _flock_holder(self.path) or "unknown"


def _flock_holder(path: Path) -> str | None:
    """The pid that holds a `flock` on `path`, from /proc/locks (Linux), if any."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"
        flock = len(parts) >= 6 and parts[1:4:2] == ["FLOCK", "WRITE"]
        if flock and parts[5].rsplit(":", 1)[-1] == str(inode):
            return parts[4]
    return None
