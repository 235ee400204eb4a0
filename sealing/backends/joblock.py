"""One job per sector's files, across engine restarts: a lock file held by the job itself.

A sealing command runs in its own session, so a `kill -9` of the engine does not reach it.
Two things keep a restarted engine from starting a second job beside it:

* the job's process gets SIGKILL when the engine dies (Linux `PR_SET_PDEATHSIG`, armed
  between fork and exec; elsewhere there is none);
* the job inherits an open file description holding an exclusive `flock` on the sector's
  lock file, and so does every helper process it starts, so the lock is held exactly as long
  as some part of the job lives. The engine writes the job's process group id into the file;
  a restarted engine that finds the lock held kills that group, and waits for the lock
  before it starts the new job.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

#: The directory of per-sector job lock files, under the first storage path.
LOCKS = "locks"
#: Seconds between looks at a lock held by a job that is being killed.
LOCK_POLL = 0.05
_PR_SET_PDEATHSIG = 1


class JobLockError(RuntimeError):
    """A job this engine did not start holds a sector's lock and would not die."""


@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[int]:
    """The lock file, open (not yet locked: `take_over` locks it); closed on exit."""
    try:
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JobLockError(f"cannot open the job lock file {path}: {exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


async def take_over(fd: int, path: Path, grace: float) -> None:
    """Lock `fd`; if a job left by an engine that died holds it, kill that job first.

    SIGTERM to the recorded process group, SIGKILL after `grace` seconds, and a last
    `grace` seconds for the lock to come free before giving up with `JobLockError`.
    """
    if try_lock(fd):
        os.ftruncate(fd, 0)  # no stale id: it would name someone else's process group
        return
    raw = os.pread(fd, 64, 0).decode(errors="replace").strip()
    pgid = int(raw) if raw.isdigit() else None
    for sig in (signal.SIGTERM, signal.SIGKILL, None):
        if sig is not None and pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        waited = 0.0
        while waited < grace:
            if try_lock(fd):
                os.ftruncate(fd, 0)
                return
            await asyncio.sleep(LOCK_POLL)
            waited += LOCK_POLL
    who = f"process group {pgid}" if pgid is not None else "an unknown process"
    raise JobLockError(
        f"a job this engine did not start ({who}) still holds {path} and would not die; "
        "stop it, then retry the sector"
    )


def record_job(fd: int, pgid: int) -> None:
    """Write the job's process group id into its lock file (for a restarted engine)."""
    os.pwrite(fd, f"{pgid}\n".encode(), 0)


def try_lock(fd: int) -> bool:
    """Take the exclusive lock if it is free; False if some process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def die_with(parent: int) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGKILL when the engine dies (Linux only).

    Elsewhere it is None: the lock file alone keeps a restarted engine from running a second
    job beside one that outlived the first engine.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the engine died before the signal was armed
            os._exit(1)

    return setup
