"""Acknowledged job directories: out of the job table at once, deleted later by one thread.

An acknowledged job's directory (record, result, output) is deleted. On a busy disk an
unlink or an rmdir waits for milliseconds (journal commits of other processes), and done
under the table's lock that wait held up every job of the worker, the ends of running ones
included. So `Sweeper.drop` only renames the directory into the trash beside the table's
root (one call, microseconds: the id is free again at once, as before), and a daemon thread
deletes what is there. Whatever a killed worker left in the trash is deleted by the next
table on the same root (`resume`). The trash is never read: a job in it is forgotten.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import threading

from .child import OUTPUT, RECORD, RESULT


class Sweeper:
    """Moves job directories into `trash` and deletes them on a thread of its own."""

    def __init__(self, trash: str) -> None:
        self.trash = trash
        self._names = itertools.count()
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
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
        self._queue.put(path)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        """The sweeper's loop: lives with its process (a daemon thread)."""
        while True:
            delete(self._queue.get())


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
