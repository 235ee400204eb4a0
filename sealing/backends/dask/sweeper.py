"""Acknowledged job directories: out of the job table at once, deleted later by one thread.

An acknowledged job's directory (record, result, output) is deleted. On a busy disk an
unlink or an rmdir waits for milliseconds (journal commits of other processes), and done
under the table's lock that wait held up every job of the worker, the ends of running ones
included. So `Sweeper.drop` only renames the directory into the trash beside the table's
root (one call, microseconds: the id is free again at once, as before), and a daemon thread
deletes what is there. Whatever a killed worker left in the trash is deleted by the next
table on the same root (`resume`). The trash is never read: a job in it is forgotten.

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

    def drop(self, jobdir: str) -> bool:
        """Take `jobdir` out of its table now (deleted soon); False if there is none."""
        if not os.path.isdir(jobdir):
            return False
        gone = f"{self.trash}/{os.path.basename(jobdir.rstrip('/'))}.{os.getpid()}"
        gone = f"{gone}.{next(self._names)}"
        try:
            os.rename(jobdir, gone)
        except OSError:  # no trash directory yet (or a stale name in it)
            os.makedirs(self.trash, exist_ok=True)
            try:
                os.rename(jobdir, gone)
            except OSError:
                delete(jobdir)  # in place, then
                return True
        self._later(gone)
        return True

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


def delete(jobdir: str) -> None:
    """Delete a job's directory: the files a job leaves, one call each, then the directory."""
    # rmtree's safe walk costs a dozen calls more; it only runs for a stray file.
    for name in (RECORD, RESULT, OUTPUT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{jobdir}/{name}")
    try:
        os.rmdir(jobdir)
    except FileNotFoundError:
        pass
    except OSError:  # something else in it (a spec, a temporary file)
        shutil.rmtree(jobdir, ignore_errors=True)
