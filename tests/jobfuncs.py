"""Small job functions for the Dask job registry's tests (run in the job's child process).

Each appends a line to a count file as it starts, so a test can tell how many times a job
really ran; `gate` then waits for a release file the test creates (no fixed duration).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: Seconds a gated job waits for its release before giving up (a hang guard only): the
#: tests' own, which a slow CI machine may raise (conftest's HANG_GUARD).
GATE_GUARD = float(os.environ.get("SECTORFSM_TEST_HANG_GUARD", "120"))


def _count(count_file: str) -> None:
    with open(count_file, "a") as f:
        f.write(f"{os.getpid()}\n")


def add(count_file: str, a: int, b: int) -> int:
    """a + b, counted."""
    _count(count_file)
    return a + b


def boom(message: str) -> None:
    """Fail with a traceback whose last line is `ValueError: message`."""
    raise ValueError(message)


def gate(count_file: str, release: str, value: object) -> object:
    """Count, wait until the file `release` exists, return `value`."""
    _count(count_file)
    deadline = time.monotonic() + GATE_GUARD
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return value


def stubborn(count_file: str) -> None:
    """Count, then ignore SIGTERM and wait (only SIGKILL ends it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _count(count_file)
    time.sleep(GATE_GUARD)
