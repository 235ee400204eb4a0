"""A warm per-worker process that runs each job in a pre-forked child, so no job starts a Python.

A fresh interpreter for every job costs 50-250 ms of start-up and imports; a fork of a
process that has them loaded costs about a millisecond, and reusing a child that already ran
a job costs neither. `Spawner` (in the worker) starts `python -m ...dask.spawner` once, from
a thread of its own that lives as long as it, with `PR_SET_PDEATHSIG`, so the spawner dies
with the worker. `warm()` starts it before any job (the table does so as soon as its worker
has it); a spawner that died is started again by the next job. The spawner keeps a small
pool of warm children (`pool.py`, sized by `PoolConfig`), each in its own session and dying
with the spawner, and hands each job to an idle one. For each job the worker writes
`start SEQ SPEC JOBDIR` (`SPEC`: the job's spec in hex, so the child reads no file); the
spawner answers `started SEQ PID` (or `error SEQ REASON`) and `end SEQ RC` (`RC` as
`Popen.returncode`: negative for a signal). `SpawnedChild.signal` sends `kill SEQ SIGNUM`:
the spawner signals the process group of the child only while it still runs that job. If
the spawner dies, its children die with it and every job still running is reported killed
by SIGKILL; the next job starts a new spawner.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ..joblock import die_with
from . import pool
from .child import OUTPUT
from .pool import PoolConfig

_MODULE = "sectorfsm.sealing.backends.dask.spawner"
_CHILD = "sectorfsm.sealing.backends.dask.child"


class SpawnedChild:
    """A job's run in a child of the spawner: its pid (also its process group) and its end."""

    def __init__(self, pid: int, seq: int = 0, signal: Callable[[int, int], None] | None = None):
        self.pid = pid
        self.seq = seq
        self._signal = signal
        self.returncode: int | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callback: Callable[[int], None] | None = None

    def wait(self) -> int:
        """Block until the child ended; its exit code (negative: killed by that signal)."""
        self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's process group, unless the job already ended there.

        Through the spawner, which knows whether the child still runs this job: a warm
        child's pid runs the next job once this one ended.
        """
        if self.returncode is None and self._signal is not None:
            self._signal(self.seq, sig)

    def when_done(self, callback: Callable[[int], None]) -> None:
        """Call `callback(rc)` once the child ended (at once if it has): no thread waits for it.

        It runs on the spawner's reader thread, which must not block: hand work off.
        """
        with self._lock:
            if self.returncode is None:
                self._callback = callback
                return
        callback(self.returncode)

    def ended(self, rc: int) -> None:
        """Record the child's end (called by the spawner's reader)."""
        with self._lock:
            if self.returncode is not None:
                return
            self.returncode = rc
            callback, self._callback = self._callback, None
        self._done.set()
        if callback is not None:
            callback(rc)


class Spawner:
    """The worker's side: starts the spawner process (`warm` or first job), asks it for children."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._seq = 0
        self._pending: dict[int, tuple[threading.Event, list[SpawnedChild | str]]] = {}
        self._children: dict[int, SpawnedChild] = {}
        self._closed = False

    def start(self, jobdir: Path, spec: bytes) -> SpawnedChild:
        """Fork the child of the job in `jobdir` with its `spec`; `OSError` if it cannot start."""
        answered = threading.Event()
        box: list[SpawnedChild | str] = []
        with self._lock:
            proc = self._proc if self._proc is not None else self._launch()
            self._seq += 1
            seq = self._seq
            self._pending[seq] = (answered, box)
            assert proc.stdin is not None
            try:
                proc.stdin.write(f"start {seq} {spec.hex()} {jobdir}\n".encode())
                proc.stdin.flush()
            except OSError as exc:
                self._pending.pop(seq, None)
                raise OSError(f"the job spawner is gone ({exc})") from None
        answered.wait()
        if isinstance(box[0], str):
            raise OSError(box[0])
        return box[0]

    def _kill(self, seq: int, sig: int) -> None:
        """Ask the spawner to signal the child running job `seq` (gone: it died with it)."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            with contextlib.suppress(OSError):
                proc.stdin.write(f"kill {seq} {int(sig)}\n".encode())
                proc.stdin.flush()

    @property
    def pid(self) -> int | None:
        """The spawner process's pid while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def warm(self) -> bool:
        """Start the spawner now unless it runs or was closed; False if it cannot start.

        Only the process start is waited for (a few ms): its imports happen in it meanwhile.
        A spawner that cannot start is no error here: each job then falls back as before.
        """
        with self._lock:
            if self._closed:
                return False
            if self._proc is None:
                try:
                    self._launch()
                except OSError:
                    return False
            return True

    def close(self) -> None:
        """Stop the spawner (its remaining children die with it); `warm` no longer starts it."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: the spawner exits

    def _launch(self) -> subprocess.Popen[bytes]:
        """Start the spawner from a thread that then reads its answers until it ends."""
        started = threading.Event()
        box: list[subprocess.Popen[bytes] | OSError] = []
        thread = threading.Thread(
            target=self._run, args=(started, box), name="job-spawner", daemon=True
        )
        thread.start()
        started.wait()
        if isinstance(box[0], OSError):
            raise OSError(f"cannot start the job spawner: {box[0]}")
        self._proc = box[0]
        return box[0]

    def _run(self, started: threading.Event, box: list[subprocess.Popen[bytes] | OSError]) -> None:
        """Start the spawner, then read its answers: this thread lives exactly as long as it."""
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", _MODULE, *self.config.argv()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C is the worker's to handle
                preexec_fn=die_with(os.getpid()),  # SIGKILL when the worker dies
            )
        except OSError as exc:
            box.append(exc)
            started.set()
            return
        box.append(proc)
        started.set()
        assert proc.stdout is not None
        for line in proc.stdout:
            self._answer(line.decode(errors="replace").split(" ", 2))
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
            pending, self._pending = self._pending, {}
            children, self._children = self._children, {}
        for answered, reply in pending.values():
            reply.append(f"the job spawner ended ({_exit(proc.returncode)})")
            answered.set()
        for spawned in children.values():
            spawned.ended(-signal.SIGKILL)  # PR_SET_PDEATHSIG: they died with the spawner

    def _answer(self, words: list[str]) -> None:
        """Handle one line of the spawner's: `started`, `error` or `end`."""
        kind, first, rest = [*words, "", ""][:3]
        rest = rest.rstrip("\n")
        if kind == "end":
            with self._lock:
                spawned = self._children.pop(int(first), None)
            if spawned is not None:
                spawned.ended(int(rest))
            return
        with self._lock:
            answered, box = self._pending.pop(int(first), (None, []))
            if kind == "started":
                spawned = SpawnedChild(int(rest), int(first), self._kill)
                self._children[spawned.seq] = spawned
                box.append(spawned)
            else:
                box.append(rest or "the job spawner refused the job")
        if answered is not None:
            answered.set()


def popen_child(jobdir: Path) -> subprocess.Popen[bytes]:
    """Start the job's child as a fresh interpreter (when the spawner cannot)."""
    with open(jobdir / OUTPUT, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", _CHILD, str(jobdir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # kill reaches whatever the job starts
            preexec_fn=die_with(os.getpid()),  # SIGKILL when the worker dies
        )


def _exit(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


if __name__ == "__main__":
    sys.exit(pool.main(sys.argv[1:]))
