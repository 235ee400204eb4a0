"""The operating-system side of a job's child: signalling it, finding a stray, its last words.

Shared by the job registry (`jobs.py`) and the worker's spawner (`spawner.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from .child import OUTPUT, child_output, job_file
from .spawner import SpawnedChild

#: Bytes of the child's output kept for its error message.
TAIL = 4096


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to process group `pid` (gone or not ours: nothing)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def signal_child(proc: subprocess.Popen[bytes] | SpawnedChild, sig: int) -> None:
    """Send `sig` to the process group running a job (a warm child's: only while it runs it)."""
    if isinstance(proc, SpawnedChild):
        proc.signal(sig)
    else:
        signal_group(proc.pid, sig)


def kill_stray(pid: int, prefix: str) -> None:
    """SIGKILL a child that outlived its worker (no `PR_SET_PDEATHSIG`), if `pid` is it.

    A forked child running the job (its files' path `prefix`) is known by its stdout (the
    job's output file), an exec'd one by its command line.
    """
    if pid <= 0:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stdout = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return  # gone (or no /proc: nothing to check it against)
    outputs = (job_file(prefix, OUTPUT), child_output(os.path.dirname(prefix), pid))
    if prefix.encode() in cmdline.split(b"\0") or stdout in outputs:
        signal_group(pid, signal.SIGKILL)


def describe_exit(rc: int | None) -> str:
    """`killed by SIGTERM` or `exit code 1`, for an exit code as `Popen.returncode`."""
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def last_line(output: str) -> str:
    """The last non-blank line the child printed (a traceback ends with the exception)."""
    try:
        with open(output, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
