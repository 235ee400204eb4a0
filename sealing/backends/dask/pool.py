"""The job spawner's process: a small pool of warm job children, reused job after job.

Lotus runs all of a worker's sealing work inside one long-lived `lotus-worker` process
(`cmd/lotus-seal-worker/main.go@v1.11.3`), so reusing a process across jobs is the Lotus
norm; here each job still gets a process of its own for as long as it runs, which a kill can
stop without touching the worker. The spawner (`python -m ...dask.spawner`, started by the
worker's `Spawner`) imports the job functions once, then forks up to `PoolConfig.size`
children like a pre-fork server. Each child calls `setsid()` (its process group is what a
kill signals), dies with the spawner (`PR_SET_PDEATHSIG`), and runs one job at a time
(`warm.serve`), then waits on its socket for the next. A child that was killed or died is
replaced; one that ran `max_jobs` jobs, grew past `max_rss_mib`, or was left with a thread
or a process of its job running is retired after that job, so no job meets another's
leftovers and memory stays bounded. With `size = 0` every job gets a fresh fork.

Lines from the worker: `start SEQ SPEC JOBDIR` (`SPEC` in hex) and `kill SEQ SIGNUM`; the
spawner answers `started SEQ PID` (or `error SEQ REASON`) and `end SEQ RC` once the job's
child reported its exit code or died (`RC` as `Popen.returncode`: negative for a signal).
A kill names the job, not the pid, so it never reaches the next job of the same child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..joblock import die_with
from . import warm

#: Modules the spawner imports before its first fork, so that no job child imports them:
#: the `dask` sealer's job functions (`adapter.py`) and what they use.
PRELOAD = ("sectorfsm.sealing.backends.dask.adapter",)
#: The Dask config section of the pool's settings (`sectors.child-pool.size`, ...; also
#: `DASK_SECTORS__CHILD_POOL__SIZE=2` in the environment).
CONFIG_KEY = "sectors.child-pool"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How many warm job children a worker keeps, and when one is replaced by a fresh fork."""

    #: Children kept between jobs (idle or busy); 0: a fresh fork for every job.
    size: int = 4
    #: Jobs a child runs before it is replaced (bounds what a job can leave behind).
    max_jobs: int = 100
    #: A child whose resident memory passed this after a job is replaced.
    max_rss_mib: int = 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name == "size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                key = f"{CONFIG_KEY}.{field.name.replace('_', '-')}"
                raise ValueError(f"bad {key} {value!r}: give a whole number >= {least}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> PoolConfig:
        """The settings of the `sectors.child-pool` config section (dashes or underscores)."""
        known = {f.name for f in dataclasses.fields(cls)}
        given = {str(k).replace("-", "_"): v for k, v in (values or {}).items()}
        unknown = sorted(set(given) - known)
        if unknown:
            names = ", ".join(n.replace("_", "-") for n in sorted(known))
            raise ValueError(f"unknown {CONFIG_KEY} setting {unknown[0]!r}: use {names}")
        return cls(**given)

    def argv(self) -> list[str]:
        """The spawner's command-line arguments for these settings."""
        return [str(self.size), str(self.max_jobs), str(self.max_rss_mib)]

    @classmethod
    def from_argv(cls, argv: list[str]) -> PoolConfig:
        """The settings `argv` gave (the defaults without arguments)."""
        return cls(*map(int, argv)) if argv else cls()


@dataclass(slots=True)
class _Child:
    """A warm child as the spawner knows it."""

    pid: int
    sock: socket.socket
    #: The job it runs now; 0 while idle.
    seq: int = 0
    buf: bytes = b""


class Pool:
    """The spawner's children: idle ones take the next job, dead or retired ones are replaced."""

    def __init__(self, config: PoolConfig, report: Callable[[str], None]) -> None:
        self.config = config
        self.report = report
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}
        self.idle: list[_Child] = []
        self.busy: dict[int, _Child] = {}
        self.wakeup = os.pipe()
        self.arm = die_with(os.getpid())  # made once: a forked child only calls it

    def start(self, seq: int, spec: bytes, jobdir: str) -> None:
        """Hand the job to an idle child (a new one if none is idle); report `started`."""
        try:
            child = self.idle.pop() if self.idle else self._fork()
        except OSError as exc:
            self.report(f"error {seq} cannot fork the job's child: {exc}")
            return
        try:
            child.sock.sendall(f"{seq} {spec.hex()} {jobdir}\n".encode())
        except OSError:
            # Died while idle (its end is reaped later): the job goes to a fresh fork.
            self._drop(child)
            self.start(seq, spec, jobdir)
            return
        child.seq = seq
        self.busy[seq] = child
        self.report(f"started {seq} {child.pid}")

    def kill(self, seq: int, sig: int) -> None:
        """Signal the process group of the child running job `seq` (none: it ended)."""
        child = self.busy.get(seq)
        if child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)

    def fill(self) -> None:
        """Fork children until the pool has its size again (after a start, a death, a retire)."""
        while len(self.children) < self.config.size:
            try:
                self.idle.append(self._fork())
            except OSError:
                return  # the next job forks on demand, or reports why it cannot

    def readable(self, child: _Child) -> None:
        """Read what the child said: its job's end (`RC RETIRE`)."""
        try:
            data = child.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(child.sock)  # gone: its reaping reports the job, if any
            return
        child.buf += data
        while b"\n" in child.buf:
            line, child.buf = child.buf.split(b"\n", 1)
            self._ended(child, line.decode(errors="replace"))

    def reap(self) -> None:
        """Report the job of every child that died; forget children that exited."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.get(pid)
            if child is None:
                continue
            with contextlib.suppress(OSError):  # its last words come before its death
                if child.seq and child.sock.fileno() >= 0:
                    self._drain(child)
            if child.seq:
                self.busy.pop(child.seq, None)
                self.report(f"end {child.seq} {os.waitstatus_to_exitcode(status)}")
                child.seq = 0
            self._drop(child)

    def _drain(self, child: _Child) -> None:
        while True:
            try:
                data = child.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                return
            child.buf += data
            while b"\n" in child.buf:
                line, child.buf = child.buf.split(b"\n", 1)
                self._ended(child, line.decode(errors="replace"))

    def _ended(self, child: _Child, line: str) -> None:
        """The child finished its job: report it; keep the child unless it retires."""
        rc, retire, reason = [*line.split(" ", 2), "", ""][:3]
        if child.seq:
            self.busy.pop(child.seq, None)
            self.report(f"end {child.seq} {int(rc)}")
            child.seq = 0
        if retire == "1" or len(self.children) > self.config.size:
            if reason:
                print(f"job child {child.pid} retired: {reason}", file=sys.stderr, flush=True)
            self._drop(child)  # EOF on its socket: it exits (and is reaped)
        elif child not in self.idle:
            self.idle.append(child)

    def _drop(self, child: _Child) -> None:
        """Forget the child and close its socket (an idle child exits on the EOF)."""
        self.children.pop(child.pid, None)
        with contextlib.suppress(ValueError):
            self.idle.remove(child)
        if child.sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.sock)
            child.sock.close()

    def _fork(self) -> _Child:
        """Fork a warm child; in it, close what is the spawner's and serve jobs."""
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                ours.close()
                for other in self.children.values():
                    other.sock.close()
                self.selector.close()
                for fd in self.wakeup:
                    os.close(fd)
                warm.serve(theirs, self.config, self.arm)
            finally:
                os._exit(1)
        theirs.close()
        child = _Child(pid, ours)
        self.children[pid] = child
        self.selector.register(ours, selectors.EVENT_READ, child)
        return child


def main(argv: list[str]) -> int:
    """The spawner's loop: run `start` lines on the pool's children until stdin closes."""
    config = PoolConfig.from_argv(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # What is loaded now is shared by every child: the collector must not copy its pages.
    gc.freeze()

    def report(line: str) -> None:
        os.write(1, f"{line}\n".encode())

    pool = Pool(config, report)
    for fd in pool.wakeup:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(pool.wakeup[1])
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    pool.selector.register(0, selectors.EVENT_READ)
    pool.selector.register(pool.wakeup[0], selectors.EVENT_READ)
    pool.fill()
    pending = b""
    while True:
        for key, _ in pool.selector.select():
            if isinstance(key.data, _Child):
                pool.readable(key.data)
            elif key.fd == pool.wakeup[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(pool.wakeup[0], 4096)
            else:
                data = os.read(0, 65536)
                if not data:
                    return 0  # the worker closed us: the children die with this process
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    _command(pool, line.decode())
        pool.reap()
        pool.fill()


def _command(pool: Pool, line: str) -> None:
    kind, seq, rest = [*line.split(" ", 2), "", ""][:3]
    if kind == "start":
        spec, _, jobdir = rest.partition(" ")
        pool.start(int(seq), bytes.fromhex(spec), jobdir)
    elif kind == "kill":
        pool.kill(int(seq), int(rest))
