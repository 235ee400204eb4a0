"""Job functions for the warm child pool's tests: what one job leaves in its process.

They run in a job's child (tests/ is on the spawner's PYTHONPATH); each returns what the
test checks, starting with the child's pid, so a test can tell whether two jobs shared it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

#: Seconds a gated job or a leftover waits before giving up (a hang guard only): the
#: tests' own, which a slow CI machine may raise (conftest's HANG_GUARD).
GUARD = float(os.environ.get("SECTORFSM_TEST_HANG_GUARD", "120"))


def own_record() -> list[Any]:
    """The pid, and the bytes of this job's record as the job starts (beside its output): the
    latest record naming this process."""
    root = Path(os.readlink("/proc/self/fd/1")).parent  # this child's output file's
    mine = []
    for path in root.glob("*.record"):
        raw = path.read_bytes()
        fields = msgpack.unpackb(raw)
        if fields["pid"] == os.getpid():
            mine.append((fields["started"], raw))
    return [os.getpid(), max(mine)[1]]


def dirty() -> int:
    """Change what a process carries from job to job: cwd, environment, umask, handlers."""
    os.chdir("/")
    os.environ["POOL_TEST_LEFTOVER"] = "1"
    os.umask(0o077)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.path.insert(0, "/nonexistent-pool-test")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (a job that forgot to put it back)
    return os.getpid()


def state() -> list[Any]:
    """What `dirty` changes, as this job finds it."""
    umask = os.umask(0o022)
    os.umask(umask)
    return [
        os.getpid(),
        os.getcwd(),
        os.environ.get("POOL_TEST_LEFTOVER"),
        umask,
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        sys.path[0] == "/nonexistent-pool-test",
        sys.stdout is sys.__stdout__,
    ]


def leave_thread() -> int:
    """Return while a thread of this job still runs."""
    threading.Thread(target=time.sleep, args=(GUARD,), daemon=True).start()
    return os.getpid()


def leave_process() -> list[int]:
    """Return while a process this job started still runs; [child's pid, that process's pid]."""
    proc = subprocess.Popen(["sleep", str(GUARD)])
    return [os.getpid(), proc.pid]


def gate_with_helper(count_file: str, release: str) -> int:
    """Start a helper process (same group), count `pid helper`, wait for `release`."""
    helper = subprocess.Popen(["sleep", str(GUARD)])
    with open(count_file, "a") as f:
        f.write(f"{os.getpid()} {helper.pid}\n")
    deadline = time.monotonic() + GUARD
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    helper.kill()
    helper.wait()
    return os.getpid()
