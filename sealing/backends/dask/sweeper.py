"""Acknowledged jobs' files: out of the job table at once, deleted later by one thread.

An acknowledged job's files (result, output, record) are deleted. On a busy disk an unlink
waits for milliseconds (journal commits of other processes), and done under the table's
lock that wait held up every job of the worker, the ends of running ones included. So
`Sweeper.drop` only renames the job's record into the trash beside the table's root
(microseconds: the job is forgotten at once, and so after a kill of the worker), and a
daemon thread deletes it there and the job's other files in place (a rename each cost more
CPU than their deletion). Until it did, `settle` deletes them for a job that takes the same
id again. Whatever a killed worker left in the trash is deleted by the next table on the
same root (`resume`); files it left beside no record, by the table (`JobTable.recover`).
The trash is never read: a job in it is forgotten.

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
    """Moves job records into `trash` and deletes jobs' files on a thread of its own."""

    def __init__(self, trash: str, delay: float = SWEEP_DELAY) -> None:
        self.trash = trash
        self.delay = delay
        self._names = itertools.count()
        #: What to delete, by job (a trash entry: by its path).
        self._pending: dict[str, list[str]] = {}
        #: Jobs whose files the thread deletes now.
        self._busy: set[str] = set()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._swept = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def drop(self, key: str, record: str, files: Iterable[str] = ()) -> bool:
        """Forget job `key` now (its `record` renamed into the trash) and delete it and its
        other `files` soon; False if it had no record (then nothing changes)."""
        gone = f"{self.trash}/{os.path.basename(record)}.{os.getpid()}.{next(self._names)}"
        try:
            os.rename(record, gone)
        except FileNotFoundError:
            if not os.path.lexists(record):
                return False
            os.makedirs(self.trash, exist_ok=True)  # no trash directory yet
            gone = self._move(record, gone)
        except OSError:  # a stale name in the trash, or no room for it there
            gone = self._move(record, gone)
        self._later(gone)
        self._later(key, list(files))
        return True

    def settle(self, key: str) -> None:
        """Delete now what `drop` left of job `key` (or wait until the thread has): a new
        job under the same id must find none of its files, nor lose its own to the thread."""
        with self._swept:
            files = self._pending.pop(key, ())
            while key in self._busy:
                self._swept.wait()
        for path in files:
            delete(path)

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

    def _later(self, key: str, paths: list[str] | None = None) -> None:
        """Delete `paths` (default: `key` itself) on the thread, in its next batch."""
        with self._lock:
            self._pending.setdefault(key, []).extend([key] if paths is None else paths)
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
                batch, self._pending = self._pending, {}
                self._busy.update(batch)
                self._wake.clear()
            for key, paths in batch.items():
                for path in paths:
                    delete(path)
                with self._swept:
                    self._busy.discard(key)
                    self._swept.notify_all()


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
