"""Acknowledged jobs' files: out of the job table at once, deleted later by one thread.

An acknowledged job's files (result, output, record) are deleted. On a busy disk an unlink
waits for milliseconds (journal commits of other processes), and done under the table's
lock that wait held up every job of the worker, the ends of running ones included. So
`Sweeper.drop` only renames the files into the trash beside the table's root (microseconds:
the id is free again at once), and a daemon thread deletes what is there. Whatever a killed
worker left in the trash is deleted by the next table on the same root (`resume`). The
trash is never read: a job in it is forgotten.

The thread deletes in batches, woken at most once per `SWEEP_DELAY`: woken for every job,
its wake-up and its turn at the interpreter lock cost the worker's event loop more than
the deletions (it held the lock while it woke the thread).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time
from collections.abc import Iterable

from .child import OUTPUT, RECORD, RESULT

#: Seconds the sweeper gathers dropped directories before it deletes them.
SWEEP_DELAY = 0.2


class Sweeper:
    """Moves job directories into `trash` and deletes them on a thread of its own."""

    def __init__(self, trash: str, delay: float = SWEEP_DELAY) -> None:
        self.trash = trash
        self.delay = delay
        self._names = itertools.count()
        self._pending: list[str] = []
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def drop(self, paths: Iterable[str]) -> bool:
        """Take the files `paths` out of their table now, in order (deleted soon); False if
        none of them was there."""
        moved = []
        for path in paths:
            gone = f"{self.trash}/{os.path.basename(path)}.{os.getpid()}.{next(self._names)}"
            try:
                os.rename(path, gone)
            except FileNotFoundError:
                if os.path.lexists(path):  # no trash directory yet
                    os.makedirs(self.trash, exist_ok=True)
                    gone = self._move(path, gone)
                else:
                    continue
            except OSError:  # a stale name in the trash, or no room for it there
                gone = self._move(path, gone)
            moved.append(gone)
        for gone in moved:
            self._later(gone)
        return bool(moved)

    @staticmethod
    def _move(path: str, gone: str) -> str:
        """`path` renamed to `gone`, or deleted in place if it cannot be; what to sweep."""
        try:
            os.rename(path, gone)
            return gone
        except OSError:
            delete(path)
            return path

    def resume(self) -> None:
        """Delete what is left in the trash (by a process that died before it could)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.trash):
                self._later(f"{self.trash}/{name}")

    def _later(self, path: str) -> None:
        with self._lock:
            self._pending.append(path)
            first = len(self._pending) == 1  # else the thread is woken already
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
                self._thread.start()
        if first:
            self._wake.set()

    def _run(self) -> None:
        """The sweeper's loop: lives with its process (a daemon thread)."""
        while True:
            self._wake.wait()
            time.sleep(self.delay)  # what other jobs drop meanwhile joins this batch
            with self._lock:
                batch, self._pending = self._pending, []
                self._wake.clear()
            for path in batch:
                delete(path)


def delete(path: str) -> None:
    """Delete a job's file, or a job's directory (as workers before the flat layout left)."""
    try:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError:  # a directory: its files one call each, rmtree only for a stray file
        pass
    for name in (RECORD, RESULT, OUTPUT):
        with contextlib.suppress(OSError):
            os.unlink(f"{path}/{name}")
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:  # something else in it (a spec, a temporary file)
        shutil.rmtree(path, ignore_errors=True)
