"""Shared test helpers: child processes that never outlive their test, and waits on events.

Tests wait for something observable (a line a child printed, a file that grew, a state in
the store), never for a fixed time. The timeouts below only turn a hang into a clear failure;
on a loaded machine a passing test finishes long before any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

T = TypeVar("T")

# Property tests run real engines: an example's run time depends on the machine's load, so
# it must never fail a test (deadline), nor should slow data generation (too_slow).
settings.register_profile("sectorfsm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sectorfsm"))

#: Seconds before a wait gives up. A hang guard, far above what any wait takes under load.
HANG_GUARD = float(os.environ.get("SECTORFSM_TEST_HANG_GUARD", "120"))
#: This directory: `sectors worker` children import test job functions from it.
TESTS = Path(__file__).resolve().parent


def child_env() -> dict[str, str]:
    """This environment, with the tests directory importable by child processes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


async def eventually(check: Callable[[], Any], what: str, guard: float = HANG_GUARD) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; `guard` s at most."""
    deadline = time.monotonic() + guard
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"hang guard: {what} not seen in {guard:g} s")
        await asyncio.sleep(0.01)


class Child:
    """A process started by `Spawner`, its output read line by line in a thread."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, log: Path | None) -> None:
        self.popen = popen
        self.name = name
        #: Where stderr goes when it is not merged into stdout.
        self.log = log
        self.lines: list[str] = []
        self.cursor = 0  # lines before this one were matched by `wait_for_line` already
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def _read(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # the pipe was closed under us at teardown
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def output(self) -> str:
        """Everything it printed so far (stdout, and stderr if merged)."""
        with self._cond:
            return "".join(f"{line}\n" for line in self.lines)

    def stderr(self) -> str:
        """The tail of its stderr log, when stderr was not merged into stdout."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-3000:]

    def describe(self) -> str:
        """Its name, exit status and the tail of what it printed, for failure messages."""
        return (
            f"{self.name} (pid {self.pid}, rc={self.popen.poll()}):\n"
            f"{self.output()[-3000:]}\n{self.stderr()}"
        )

    def wait_for(
        self, check: Callable[[list[str]], T | None], what: str, timeout: float = HANG_GUARD
    ) -> T:
        """Wait until `check(lines)` returns something other than None, and return it.

        Fails at once if the child's output ends (it exited) without `check` passing.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = check(self.lines)
                if found is not None:
                    return found
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"hang guard: {what} not seen in {timeout:g} s; {self.describe()}")
                self._cond.wait(left)
        self.popen.wait()
        pytest.fail(f"{what} never came: the child exited; {self.describe()}")

    def wait_for_line(
        self, pattern: str, timeout: float = HANG_GUARD, *, anywhere: bool = False
    ) -> re.Match[str]:
        """Wait for the next line (after the last one matched) that `re.search`es `pattern`.

        With `anywhere=True`, any line printed so far counts, and the cursor stays put.
        """
        regex = re.compile(pattern)

        def check(lines: list[str]) -> re.Match[str] | None:
            for i in range(0 if anywhere else self.cursor, len(lines)):
                match = regex.search(lines[i])
                if match is not None:
                    if not anywhere:
                        self.cursor = i + 1
                    return match
            return None

        return self.wait_for(check, f"a line matching {pattern!r}", timeout)

    def count(self, pattern: str) -> int:
        """How many lines printed so far match `pattern`."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def finish(self, timeout: float = HANG_GUARD) -> int:
        """Wait for it to exit by itself (killing it if it hangs); returns its exit code."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"hang guard: {self.name} did not exit in {timeout:g} s; {self.describe()}")
        self._reader.join(timeout)
        return rc

    def interrupt(self) -> None:
        """Send SIGINT (Ctrl-C) to the child alone."""
        self.popen.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL a child that must still be running (it must not have died by itself)."""
        assert self.popen.poll() is None, f"it died by itself: {self.describe()}"
        self.kill_group()
        assert self.popen.returncode == -signal.SIGKILL, self.describe()

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (its own children too) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()


class Spawner:
    """Starts children in their own process groups; `close()` kills every group it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []

    def __call__(
        self,
        args: Sequence[str | Path],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        merge_stderr: bool = True,
        stdin: bool = False,
    ) -> Child:
        """Start `args`; stdout (and stderr, unless `merge_stderr=False`) is read by a thread.

        With `stdin=True` the child's stdin is a pipe (`child.popen.stdin`), else /dev/null.
        """
        n = len(self.children)
        name = name or f"child-{n}"
        log = None if merge_stderr else self.tmp / f"{name}-{n}.stderr"
        with contextlib.ExitStack() as stack:
            err: Any = subprocess.STDOUT if log is None else stack.enter_context(open(log, "wb"))
            popen = subprocess.Popen(
                [str(a) for a in args],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: killed as a whole
            )
        child = Child(popen, name, log)
        self.children.append(child)
        return child

    def python(self, *args: str | Path, **kw: Any) -> Child:
        """Start this interpreter with `args`."""
        return self([sys.executable, *args], **kw)

    def run(
        self, args: Sequence[str | Path], timeout: float = HANG_GUARD, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` to completion, like `subprocess.run(capture_output=True, text=True)`."""
        child = self(args, merge_stderr=False, **kw)
        rc = child.finish(timeout)
        assert child.log is not None
        stderr = child.log.read_text(errors="replace")
        return subprocess.CompletedProcess([str(a) for a in args], rc, child.output(), stderr)

    def close(self) -> None:
        """Kill every child's process group, reap it, close its pipe and keep its output.

        The output goes to `<name>-<n>.out` in the test's temp dir: a test that failed once
        under load can be diagnosed from what its workers and engines printed.
        """
        for n, child in enumerate(self.children):
            child.kill_group()
            if child.popen.stdout is not None:
                child.popen.stdout.close()
            child._reader.join(5)
            with contextlib.suppress(OSError):
                (self.tmp / f"{child.name}-{n}.out").write_text(child.output())


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """Start child processes; whatever is left of them is killed at teardown."""
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.close()


def wait_for_line(child: Child, pattern: str, timeout: float = HANG_GUARD) -> re.Match[str]:
    """Wait for `child` to print a line matching `pattern` (see `Child.wait_for_line`)."""
    return child.wait_for_line(pattern, timeout)


def until(
    check: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = HANG_GUARD,
    interval: float = 0.01,
) -> T:
    """Poll `check()` until it returns something other than None/False, and return that.

    For conditions no child prints (a file that grew, a record in a store). The poll
    interval only sets how soon the change is noticed; `timeout` is a hang guard. `what`
    (or what it returns, computed only on failure) names the condition.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            name = what if isinstance(what, str) else what()
            pytest.fail(f"hang guard: {name} not seen in {timeout:g} s")
        time.sleep(interval)


async def settle(rounds: int = 3) -> None:
    """Yield until the event loop has had nothing else to run for `rounds` turns.

    For tests whose code under test runs entirely on the loop: once this returns, every
    callback and task that was ready has run as far as it can without waiting on time or
    I/O, however slow the machine.
    """
    loop = asyncio.get_running_loop()
    idle = 0
    while idle < rounds:
        await asyncio.sleep(0)
        # CPython's loops keep runnable callbacks in `_ready` (as the virtual clock knows).
        idle = idle + 1 if not getattr(loop, "_ready", None) else 0


def run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async test body (a coroutine function taking no arguments) on a fresh loop."""
    return asyncio.run(fn())
