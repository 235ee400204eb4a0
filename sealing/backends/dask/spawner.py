"""The worker's warm job children: forked by a spawner process, spoken to by the worker directly.

A fresh interpreter for every job costs 50-250 ms of start-up and imports; a fork of a
process that has them loaded costs about a millisecond, and reusing a child that already ran
a job costs neither. `Spawner` (in the worker) starts `python -m ...dask.spawner` once, from
a thread of its own that lives as long as it, with `PR_SET_PDEATHSIG`, so the spawner dies
with the worker. `warm()` starts it before any job (the table does so as soon as its worker
has it); a spawner that died is started again by the next job.

The spawner only forks, reaps and signals (`pool.py`): each child it forks (its own session,
dying with the spawner) comes with one end of a socket pair, which the spawner hands to the
worker (`SCM_RIGHTS`) and closes. From then on the worker talks to the child itself: it
writes `SEQ SPEC PREFIX` (`SPEC`: the job's spec in hex, so the child reads no file) and
reads `RC RETIRE [REASON]` when the job ended, on the thread that also reads the spawner
(`child PID` with the socket, `died PID RC` once a child is reaped, `error REASON`). A job's
start and end are one message each, with no process and no thread between the worker and its
child. The worker keeps `PoolConfig.size` children, idle or busy, and forks one on demand
when none is idle; a child that retires (`RETIRE` 1: it ran `max_jobs`, grew past
`max_rss_mib`, or its job left a thread or a process), was signalled, or is one too many is
let go after its job (its socket closed: it exits), and a replacement is forked.

`SpawnedChild.signal` asks the spawner to signal the child's process group (the spawner, its
parent, is the one process that knows the pid is still that child), only while the child
still runs that job in the worker's books, and marks the child so it never gets another
job: a kill can reach no later job. If a child dies mid-job its job ends with the exit status
the spawner reports; if the spawner dies, its children die with it and every job still
running is reported killed by SIGKILL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..joblock import die_with
from . import pool
from .child import OUTPUT, job_file
from .pool import PoolConfig

_MODULE = "sectorfsm.sealing.backends.dask.spawner"
_CHILD = "sectorfsm.sealing.backends.dask.child"
#: Largest control message (a `child`/`died`/`error` line).
_MSG = 4096


class SpawnedChild:
    """A job's run in a warm child: its pid (also its process group) and its end."""

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

        The worker's books decide: a warm child's pid runs the next job once this one ended.
        """
        if self.returncode is None and self._signal is not None:
            self._signal(self.seq, sig)

    def when_done(self, callback: Callable[[int], None]) -> None:
        """Call `callback(rc)` once the child ended (at once if it has): no thread waits for it.

        It runs on the spawner's reader thread, which must not block for long.
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


@dataclass(slots=True, eq=False)
class WarmChild:
    """A warm child as the worker knows it: reserved for a job with `Spawner.reserve`."""

    pid: int
    sock: socket.socket
    #: The job it runs now (None while idle or reserved).
    job: SpawnedChild | None = None
    buf: bytes = b""
    #: Signalled for its job: let go after it, never given another.
    doomed: bool = False
    #: Its exit status once the spawner reaped it.
    exit: int | None = None


class Spawner:
    """The worker's side: starts the spawner (`warm` or first job), keeps the warm children."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._seq = 0
        #: Every warm child the spawner reported and has not reaped, by pid.
        self._children: dict[int, WarmChild] = {}
        self._idle: list[WarmChild] = []
        self._busy: dict[int, WarmChild] = {}
        #: Jobs waiting for a fork: each gets the next child that comes (or an error).
        self._waiting: collections.deque[tuple[threading.Event, list[WarmChild | str]]] = (
            collections.deque()
        )
        #: Forks asked of the spawner and not answered yet.
        self._forking = 0
        self._closed = False

    # ------------------------------------------------------------------ jobs

    def start(self, prefix: str, spec: bytes) -> SpawnedChild:
        """Run the job (files at `prefix`) with its `spec` in a warm child; `OSError` if none."""
        return self.run(self.reserve(), prefix, spec)

    def take_idle(self) -> WarmChild | None:
        """An idle warm child for one job, or None at once (none idle: `reserve` waits)."""
        with self._lock:
            while self._idle and not self._closed:
                warm = self._idle.pop()
                if warm.exit is None:
                    return warm
        return None

    def reserve(self) -> WarmChild:
        """An idle warm child for one job (forked if none is idle); `OSError` if impossible."""
        answered = threading.Event()
        box: list[WarmChild | str] = []
        with self._lock:
            if self._closed:
                raise OSError("the job spawner is closed")
            if self._ctl is None:
                self._launch()
            while self._idle:
                warm = self._idle.pop()
                if warm.exit is None:
                    return warm
            self._waiting.append((answered, box))
            try:
                if self._forking < len(self._waiting):  # else one already on its way is ours
                    self._fork()
            except OSError as exc:
                self._waiting.remove((answered, box))
                raise OSError(f"the job spawner is gone ({exc})") from None
        answered.wait()
        if isinstance(box[0], str):
            raise OSError(box[0])
        return box[0]

    def run(
        self,
        warm: WarmChild,
        prefix: str,
        spec: bytes,
        on_end: Callable[[int], None] | None = None,
    ) -> SpawnedChild:
        """Hand the job to the `reserve`d child `warm`; `on_end(rc)` is called once it ended."""
        with self._lock:
            self._seq += 1
            spawned = SpawnedChild(warm.pid, self._seq, self._kill)
            if on_end is not None:
                spawned.when_done(on_end)
            gone = warm.exit
            if gone is None:
                warm.job = spawned
                self._busy[spawned.seq] = warm
        if gone is not None:  # it died between its reservation and its job: that job failed
            spawned.ended(gone)
            return spawned
        with contextlib.suppress(OSError):  # dead meanwhile: its reaping ends the job
            warm.sock.sendall(f"{spawned.seq} {spec.hex()} {prefix}\n".encode())
        return spawned

    def release(self, warm: WarmChild) -> None:
        """Give back a `reserve`d child that got no job."""
        with self._lock:
            if warm.exit is None and warm.pid in self._children:
                self._idle.append(warm)

    def _kill(self, seq: int, sig: int) -> None:
        """Have the child running job `seq` signalled (ended: nothing); it gets no later job."""
        with self._lock:
            warm = self._busy.get(seq)
            if warm is None:
                return
            warm.doomed = True
            self._send(f"kill {warm.pid} {int(sig)}")

    # ------------------------------------------------------------------ the spawner

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
            if self._ctl is None:
                try:
                    self._launch()
                except OSError:
                    return False
            return True

    def close(self) -> None:
        """Stop the spawner (its children die with it); `warm` no longer starts it."""
        with self._lock:
            self._closed = True
            ctl = self._ctl
        if ctl is not None:
            with contextlib.suppress(OSError):
                ctl.shutdown(socket.SHUT_RDWR)  # EOF both ways: the spawner and our reader end

    def _send(self, line: str) -> None:
        """One control message to the spawner (with `_lock` held)."""
        if self._ctl is None:
            raise OSError("the job spawner is not running")
        self._ctl.send(line.encode())

    def _fork(self) -> None:
        """Ask the spawner for one more warm child (with `_lock` held)."""
        self._send("fork")
        self._forking += 1

    def _refill(self) -> None:
        """Fork children until the pool has its size again (with `_lock` held)."""
        with contextlib.suppress(OSError):  # the next job forks on demand or reports why not
            while not self._closed and len(self._children) + self._forking < self.config.size:
                self._fork()

    def _launch(self) -> None:
        """Start the spawner from a thread that then reads it and the children (`_lock` held)."""
        started = threading.Event()
        box: list[subprocess.Popen[bytes] | OSError] = []
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        thread = threading.Thread(
            target=self._run, args=(ours, theirs, started, box), name="job-spawner", daemon=True
        )
        thread.start()
        started.wait()
        theirs.close()
        if isinstance(box[0], OSError):
            ours.close()
            raise OSError(f"cannot start the job spawner: {box[0]}")
        self._proc, self._ctl, self._forking = box[0], ours, 0
        self._refill()

    def _run(
        self,
        ctl: socket.socket,
        theirs: socket.socket,
        started: threading.Event,
        box: list[subprocess.Popen[bytes] | OSError],
    ) -> None:
        """Start the spawner, then read it and its children: this thread lives as long as it."""
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", _MODULE, *self.config.argv()],
                stdin=theirs.fileno(),
                start_new_session=True,  # a terminal's Ctrl-C is the worker's to handle
                preexec_fn=die_with(os.getpid()),  # SIGKILL when the worker dies
            )
        except OSError as exc:
            box.append(exc)
            started.set()
            return
        box.append(proc)
        started.set()
        selector = selectors.DefaultSelector()
        selector.register(ctl, selectors.EVENT_READ)
        try:
            while self._serve(ctl, selector):
                pass
        finally:
            proc.wait()
            self._spawner_ended(proc, ctl, selector)
            selector.close()

    def _serve(self, ctl: socket.socket, selector: selectors.BaseSelector) -> bool:
        """One round of the reader: False once the spawner is gone."""
        for key, _ in selector.select():
            if isinstance(key.data, WarmChild):
                self._readable(key.data, selector)
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(ctl, _MSG, 1)
            except OSError:
                msg, fds = b"", []
            if not msg:
                return False
            self._control(msg.decode(errors="replace"), fds, selector)
        return True

    def _control(self, line: str, fds: list[int], selector: selectors.BaseSelector) -> None:
        """Handle one message of the spawner's: `child PID` (+ socket), `died PID RC`, `error`."""
        kind, first, rest = [*line.split(" ", 2), "", ""][:3]
        if kind == "child" and fds:
            sock = socket.socket(fileno=fds[0])
            sock.set_inheritable(False)
            warm = WarmChild(int(first), sock)
            with self._lock:
                self._forking = max(0, self._forking - 1)
                self._children[warm.pid] = warm
                selector.register(sock, selectors.EVENT_READ, warm)
                self._hand_over(warm, fresh=True)
        elif kind == "died":
            self._died(int(first), int(rest), selector)
        elif kind == "error":
            with self._lock:
                self._forking = max(0, self._forking - 1)
                if self._waiting:
                    answered, reply = self._waiting.popleft()
                    reply.append(f"{first} {rest}".strip() or "the job spawner cannot fork")
                    answered.set()

    def _hand_over(self, warm: WarmChild, fresh: bool = False) -> None:
        """An idle child to the first job waiting for one, else to the idle list (`_lock` held).

        Jobs take the idle child put back last. A `fresh` one (never ran a job) goes under
        the others: a child that ran a job has its modules loaded, and which child the next
        job gets must not depend on when a fork happened to come back.
        """
        if self._waiting:
            answered, reply = self._waiting.popleft()
            reply.append(warm)
            answered.set()
        elif fresh:
            self._idle.insert(0, warm)
        else:
            self._idle.append(warm)

    def _readable(self, warm: WarmChild, selector: selectors.BaseSelector) -> None:
        """Read what the child said (its job's end); at EOF wait for its exit status."""
        try:
            data = warm.sock.recv(_MSG)
        except OSError:
            data = b""
        if not data:
            with self._lock:  # gone: its reaping (`died`) ends its job, if any
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(warm.sock)
                with contextlib.suppress(ValueError):
                    self._idle.remove(warm)
            return
        warm.buf += data
        while b"\n" in warm.buf:
            line, warm.buf = warm.buf.split(b"\n", 1)
            self._job_ended(warm, line.decode(errors="replace"), selector)

    def _job_ended(self, warm: WarmChild, line: str, selector: selectors.BaseSelector) -> None:
        """The child finished its job: keep it for the next job unless it is let go."""
        rc, retire, reason = [*line.split(" ", 2), "", ""][:3]
        with self._lock:
            job, warm.job = warm.job, None
            if job is not None:
                self._busy.pop(job.seq, None)
            over = len(self._children) + self._forking > self.config.size
            if retire == "1" or warm.doomed or over or self._closed or warm.exit is not None:
                if reason:
                    print(f"job child {warm.pid} retired: {reason}", file=sys.stderr, flush=True)
                self._let_go(warm, selector)
            else:
                self._hand_over(warm)
        if job is not None:
            job.ended(int(rc))

    def _let_go(self, warm: WarmChild, selector: selectors.BaseSelector) -> None:
        """Close the child's socket (it exits on EOF) and fork a replacement (`_lock` held)."""
        self._children.pop(warm.pid, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(warm)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(warm.sock)
        warm.sock.close()
        self._refill()

    def _died(self, pid: int, rc: int, selector: selectors.BaseSelector) -> None:
        """The spawner reaped child `pid`: its job, if it still had one, ended with `rc`."""
        with self._lock:
            warm = self._children.get(pid)
            if warm is None:
                return  # let go after its job: nothing ran in it
            warm.exit = rc  # from now on it is given no job
        self._drain(warm, selector)  # its last words come before its death
        with self._lock:
            job, warm.job = warm.job, None
            if job is not None:
                self._busy.pop(job.seq, None)
            self._let_go(warm, selector)
        if job is not None:
            job.ended(rc)

    def _drain(self, warm: WarmChild, selector: selectors.BaseSelector) -> None:
        """Read what the child sent before it died (without waiting)."""
        if warm.sock.fileno() < 0:
            return
        while True:
            try:
                data = warm.sock.recv(_MSG, socket.MSG_DONTWAIT)
            except OSError:
                return
            if not data:
                return
            warm.buf += data
            while b"\n" in warm.buf:
                line, warm.buf = warm.buf.split(b"\n", 1)
                self._job_ended(warm, line.decode(errors="replace"), selector)

    def _spawner_ended(
        self, proc: subprocess.Popen[bytes], ctl: socket.socket, selector: selectors.BaseSelector
    ) -> None:
        """The spawner is gone: its children died with it (`PR_SET_PDEATHSIG`)."""
        with self._lock:
            if self._ctl is ctl:
                self._proc, self._ctl, self._forking = None, None, 0
            children, self._children = self._children, {}
            for warm in children.values():
                warm.exit = -signal.SIGKILL
            self._idle.clear()
            waiting, self._waiting = self._waiting, collections.deque()
        ctl.close()
        for answered, reply in waiting:
            reply.append(f"the job spawner ended ({_exit(proc.returncode)})")
            answered.set()
        ended: list[SpawnedChild] = []
        for warm in children.values():
            self._drain(warm, selector)  # a job that ended just before the spawner keeps its end
            with self._lock:
                job, warm.job = warm.job, None
                if job is not None:
                    self._busy.pop(job.seq, None)
            warm.sock.close()
            if job is not None:
                ended.append(job)
        for job in ended:
            job.ended(-signal.SIGKILL)


def fresh_child(prefix: str, on_end: Callable[[int], None]) -> SpawnedChild:
    """Run the job in a fresh interpreter (when the spawner cannot); `OSError` if it can't.

    A thread of its own starts and reaps it, and so lives exactly as long as the child
    (`PR_SET_PDEATHSIG` fires when the thread that forked the child ends).
    """
    started = threading.Event()
    box: list[SpawnedChild | OSError] = []

    def watch() -> None:
        try:
            proc = popen_child(prefix)
        except OSError as exc:
            box.append(exc)
            started.set()
            return
        spawned = SpawnedChild(proc.pid, 0, lambda _seq, sig: _signal_group(proc.pid, sig))
        spawned.when_done(on_end)
        box.append(spawned)
        started.set()
        spawned.ended(proc.wait())

    threading.Thread(target=watch, name=f"job-{os.path.basename(prefix)}", daemon=True).start()
    started.wait()
    if isinstance(box[0], OSError):
        raise box[0]
    return box[0]


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def popen_child(prefix: str) -> subprocess.Popen[bytes]:
    """Start the job's child (files at `prefix`) as a fresh interpreter (no spawner runs)."""
    with open(job_file(prefix, OUTPUT), "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", _CHILD, prefix],
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
