"""A warm job child: runs the jobs its spawner hands it, one at a time, until it is retired.

Forked by the spawner's pool (`pool.py`), it makes its own session (a kill of its job
signals this process group: the job and whatever it started), arms `PR_SET_PDEATHSIG` on
the spawner and becomes a child subreaper, so a process its job left behind stays visible
here. For each `SEQ SPEC PREFIX` line on its socket it points stdout and stderr at its own
output file (`child.child_output`, emptied; renamed to the job's `PREFIX.output` if the job
fails), runs `child.main` (which writes the result before returning), puts back
the working directory, environment, umask, `sys.path`, standard streams and signal handlers
the job may have changed, and answers `RC RETIRE [REASON]`. It retires (exits after
answering) after `max_jobs` jobs, once its resident memory peaked past `max_rss_mib`, or
when its job left a thread or a process running, which would otherwise meet the next job.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from . import child

if TYPE_CHECKING:
    from .pool import PoolConfig

_PR_SET_CHILD_SUBREAPER = 36
#: `signal.getsignal` without its wrapping of each answer in an enum (an exception for
#: every Python handler): 2 us for all signals instead of 116, at every job's end.
_getsignal: Callable[[int], Handler] = importlib.import_module("_signal").getsignal

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(slots=True)
class Baseline:
    """What a job may change in its process, as it was before the first job."""

    cwd: str
    environ: dict[str, str]
    umask: int
    path: list[str]
    handlers: dict[int, Handler] = field(default_factory=dict)

    @classmethod
    def now(cls) -> Baseline:
        """The process's state now."""
        umask = os.umask(0o022)
        os.umask(umask)
        handlers: dict[int, Handler] = {}
        for sig in signal.valid_signals():
            with contextlib.suppress(OSError, ValueError):
                if (handler := _getsignal(sig)) is not None:
                    handlers[sig] = handler
        return cls(os.getcwd(), dict(os.environ), umask, list(sys.path), handlers)

    def restore(self) -> str:
        """Undo what the job changed; a reason to retire if something cannot be undone."""
        signal.alarm(0)
        for sig, handler in self.handlers.items():
            if _getsignal(sig) != handler:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        if sys.path != self.path:
            sys.path[:] = self.path
        os.umask(self.umask)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError as exc:
            return f"cannot return to its working directory ({exc})"
        return ""


def leftovers() -> str:
    """Why this process cannot take another job: a thread or a process of its job runs."""
    # Both checks are one system call for a job that left nothing (this runs after every
    # job): procfs counts a process's threads in its `task` directory's link count.
    try:
        threads = os.stat("/proc/self/task").st_nlink - 2
        if threads < 1:  # not that procfs: count the entries
            threads = len(os.listdir("/proc/self/task"))
    except OSError as exc:
        return f"cannot look for its job's threads ({exc})"
    if threads > 1:
        return f"its job left {threads - 1} thread(s) running"
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass  # zombies of its job's processes
    except ChildProcessError:
        return ""  # no process of its job is left, running or not
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            running = f.read().split()
    except OSError as exc:
        return f"cannot look for its job's processes ({exc})"
    if running:
        return f"its job left process(es) {' '.join(running)} running"
    return ""


def rss_mib() -> float:
    """The most resident memory this process has had, in MiB (one system call, no file)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Output:
    """This child's output file, kept open across its jobs and emptied for each."""

    __slots__ = ("fd", "path")

    def __init__(self) -> None:
        self.fd = -1
        self.path = ""

    def start(self, prefix: str) -> None:
        """Point stdout and stderr at an empty output file for the job at `prefix`."""
        path = child.child_output(os.path.dirname(prefix), os.getpid())
        if self.fd >= 0 and path == self.path:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        else:
            self.close()
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.path = path
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def keep(self, prefix: str) -> None:
        """The job failed: its output becomes its own file (the next job gets a new one)."""
        with contextlib.suppress(OSError):
            os.rename(self.path, child.job_file(prefix, child.OUTPUT))
        self.close()

    def close(self) -> None:
        """Close the file (it stays on disk)."""
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def run(prefix: str, spec: bytes, output: Output | None = None) -> int:
    """Run one job (its files' path `prefix`) with stdout and stderr in `output`; its exit
    code."""
    output = output or Output()
    output.start(prefix)
    try:
        rc = child.main(["child", prefix], spec)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    if rc != 0:
        output.keep(prefix)
    return rc


def _subreaper() -> None:
    """Become the parent of every orphan of this process's jobs (Linux; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def serve(sock: socket.socket, config: PoolConfig, arm: Callable[[], None] | None) -> NoReturn:
    """The child's life, right after the fork: jobs from `sock` until EOF or retirement."""
    os.setsid()
    if arm is not None:
        arm()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _subreaper()
    baseline = Baseline.now()
    reader = sock.makefile("rb")
    output = Output()
    done = 0
    while line := reader.readline():
        _, spec, prefix = line.decode().rstrip("\n").split(" ", 2)
        rc = run(prefix, bytes.fromhex(spec), output)
        done += 1
        reason = baseline.restore() or leftovers()
        retire = bool(reason) or done >= config.max_jobs or rss_mib() > config.max_rss_mib
        sock.sendall(f"{rc} {int(retire)} {reason}\n".encode())
        if retire:
            break
    if output.path:  # its last job ended well: nobody reads it
        with contextlib.suppress(OSError):
            os.unlink(output.path)
    os._exit(0)
