"""The job spawner's process: it forks the worker's warm job children, reaps and signals them.

Lotus runs all of a worker's sealing work inside one long-lived `lotus-worker` process
(`cmd/lotus-seal-worker/main.go@v1.11.3`), so reusing a process across jobs is the Lotus
norm; here each job still gets a process of its own for as long as it runs, which a kill can
stop without touching the worker. The spawner (`python -m ...dask.spawner`, started by the
worker's `Spawner`, its fd 0 a `SOCK_SEQPACKET` socket to the worker) imports the job
functions once, then forks a child for each `fork` message, like a pre-fork server. Each
child calls `setsid()` (its process group is what a kill signals), dies with the spawner
(`PR_SET_PDEATHSIG`) and serves jobs one at a time on its own socket (`warm.serve`); the
spawner sends the worker's end of that socket with `child PID` (`SCM_RIGHTS`) and keeps no
copy, so the worker and the child talk with nothing between them. The worker decides which
child runs what and when one retires (`spawner.py`).

Messages from the worker: `fork` and `kill PID SIGNUM` (the process group of child `PID`,
only while it is this process's unreaped child, so never a reused pid). To the worker:
`child PID` with the socket, `error REASON` for a fork that failed, and `died PID RC` once a
child is reaped (`RC` as `Popen.returncode`: negative for a signal).
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
from collections.abc import Mapping
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


class Pool:
    """The spawner's children: forked on request, reaped and reported, signalled on request."""

    def __init__(self, config: PoolConfig, ctl: socket.socket) -> None:
        self.config = config
        self.ctl = ctl
        #: Every child forked and not reaped yet.
        self.children: set[int] = set()
        self.wakeup = os.pipe()
        self.arm = die_with(os.getpid())  # made once: a forked child only calls it

    def report(self, line: str, fds: tuple[int, ...] = ()) -> None:
        """One message to the worker (with a file descriptor for `child`)."""
        socket.send_fds(self.ctl, [line.encode()], list(fds))

    def fork(self) -> None:
        """Fork a warm child and hand the worker its socket (`error` if it cannot fork)."""
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            self.report(f"error cannot fork the job's child: {exc}")
            return
        if pid == 0:
            try:
                ours.close()
                for fd in self.wakeup:
                    os.close(fd)
                warm.serve(theirs, self.config, self.arm)  # fd 0 (ours) is replaced there
            finally:
                os._exit(1)
        theirs.close()
        self.children.add(pid)
        try:
            self.report(f"child {pid}", (ours.fileno(),))
        finally:
            ours.close()  # the worker holds the one copy: it sees EOF when the child dies

    def kill(self, pid: int, sig: int) -> None:
        """Signal the process group of child `pid` (reaped or never ours: nothing)."""
        if pid in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    def reap(self) -> None:
        """Report every child that exited."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self.report(f"died {pid} {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str]) -> int:
    """The spawner's loop: run the worker's messages until its socket closes."""
    config = PoolConfig.from_argv(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # What is loaded now is shared by every child: the collector must not copy its pages.
    gc.freeze()
    pool = Pool(config, socket.socket(fileno=0))
    for fd in pool.wakeup:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(pool.wakeup[1])
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(pool.wakeup[0], selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fd == pool.wakeup[0]:
                    with contextlib.suppress(BlockingIOError):
                        os.read(pool.wakeup[0], 4096)
                    continue
                try:
                    msg = pool.ctl.recv(4096)
                except OSError:
                    msg = b""
                if not msg:
                    return 0  # the worker closed us: the children die with this process
                _command(pool, msg.decode())
            pool.reap()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # closed by the worker while we answered it: as above


def _command(pool: Pool, line: str) -> None:
    kind, *rest = line.split()
    if kind == "fork":
        pool.fork()
    elif kind == "kill" and len(rest) == 2:
        pool.kill(int(rest[0]), int(rest[1]))
