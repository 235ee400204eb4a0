"""Running a step: eagerly until its first real wait, then (only if it waits) in a Task.

Most steps of a busy engine never wait: they send the next event, or hand work to a scheduler
and return. Creating an `asyncio.Task` for each of them costs more than the rest of a
transition, so the engine starts every step the way Python 3.12's eager tasks do: it drives the
coroutine inline, and only a coroutine that actually suspends is wrapped (mid-flight) in a
Task that finishes it. A step that suspends on its first line therefore behaves exactly as if
it had run in a Task from the start.

Each step runs in its own copy of the `contextvars` context the group was started in, as a
Task created there would, so a context variable one step sets never leaks into another.

The one difference from a Task: on Python 3.11, `asyncio.current_task()` is None until the
step first suspends, so `asyncio.timeout()` and `asyncio.TaskGroup` must be entered after an
`await` (or the group created with `eager_steps=False`).

`MachineSteps` runs the steps of one group's machines on top of that: one step at a time per
machine, started once the round that planned it is committed, cancelled on request, and
handed back to the runtime (`fsm/runtime.py`) when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import traceback
import types
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from .events import StepFailed
from .machine import MAX_ERROR, Context, Machine, Step
from .tail import TailEncoder

let_go = TailEncoder.let_go

if TYPE_CHECKING:
    from .commit import Committer
    from .records import GroupRecords
    from .runtime import MachineRuntime

log = logging.getLogger("sectorfsm.fsm")

StepFn = Callable[..., Awaitable[None] | None]
#: What a driver yields when the coroutine it delegates to has returned.
_DONE = object()


@types.coroutine
def _driver() -> Generator[Any, Any, None]:
    """Delegates to one coroutine after another with `yield from`.

    A coroutine that returns inside `yield from` hands its result over without raising
    StopIteration, which is the costly part of driving it with `coro.send()` (~0.25 us of a
    ~0.5 us step). The driver then yields `_DONE` and waits for the next coroutine.
    """
    coro = yield
    while True:
        yield from coro
        coro = yield _DONE


def _new_driver() -> Any:
    driver = _driver()
    driver.send(None)
    return driver


__all__ = ["MachineSteps", "ResumedStep", "StepRunner", "call", "close"]


class ResumedStep:
    """The rest of a step that was started eagerly and then suspended.

    Awaiting it first hands the awaited object back to the driving Task (exactly what the
    coroutine yielded), then delegates every send, throw and close to the driver that still
    holds the coroutine.
    """

    __slots__ = ("_driver", "_first", "_primed")

    def __init__(self, driver: Any, first: Any) -> None:
        self._driver = driver
        self._first = first
        self._primed = True

    def __await__(self) -> Generator[Any, Any, Any]:
        return self

    def __iter__(self) -> ResumedStep:
        return self

    def __next__(self) -> Any:
        # What `await` calls at each wake-up (asyncio resumes with None): `send(None)`
        # written out, one Python call per wake-up rather than two.
        if self._primed:
            self._primed = False
            first, self._first = self._first, None
            return first
        yielded = self._driver.send(None)
        if yielded is _DONE:
            self._driver.close()
            raise StopIteration
        return yielded

    def send(self, value: Any) -> Any:
        """Resume the coroutine (the first call re-yields what it suspended on)."""
        if self._primed:
            self._primed = False
            first, self._first = self._first, None
            return first
        # (`_finished_or` inline: this runs at every wake-up of every step that waits.)
        yielded = self._driver.send(value)
        if yielded is _DONE:
            self._driver.close()
            raise StopIteration
        return yielded

    def throw(self, *args: Any) -> Any:
        """Raise an exception (a cancellation) inside the coroutine where it waits."""
        self._primed = False
        self._first = None
        return self._finished_or(self._driver.throw(*args))

    def close(self) -> None:
        """Close the coroutine (it sees GeneratorExit where it waits)."""
        self._primed = False
        self._first = None
        self._driver.close()

    def _finished_or(self, yielded: Any) -> Any:
        if yielded is _DONE:
            self._driver.close()
            raise StopIteration
        return yielded


class StepRunner:
    """Starts steps inline until they first wait; one per group (it owns a reusable driver)."""

    __slots__ = ("_driver",)

    def __init__(self) -> None:
        self._driver = _new_driver()

    def run(self, step: StepFn, ctx: Any, state: Any) -> Awaitable[None] | None:
        """Run `step(ctx, state)` until it first waits (call it inside the step's own context).

        Returns None if the step finished, or an awaitable that finishes it (to be awaited in
        a Task that runs in the same context). Raises whatever the step raised before waiting.
        """
        pending = step(ctx, state)
        if type(pending) is not types.CoroutineType:
            return pending  # None (a plain function finished), or another kind of awaitable
        driver = self._driver
        if driver.gi_running:
            return _run_alone(pending)  # started from inside another step: no reuse
        try:
            first = driver.send(pending)
        except BaseException:
            self._driver = _new_driver()  # the step raised through the driver, ending it
            raise
        if first is _DONE:
            return None
        # The step waits: the driver goes with it, to the Task that finishes it.
        self._driver = _new_driver()
        return ResumedStep(driver, first)


def _run_alone(coro: types.CoroutineType[Any, Any, Any]) -> Awaitable[None] | None:
    driver = _new_driver()
    first = driver.send(coro)
    return None if first is _DONE else ResumedStep(driver, first)


def call(step: StepFn, ctx: Any, state: Any) -> Awaitable[None] | None:
    """Call `step(ctx, state)` without running it: its Task runs it all (`eager_steps=False`)."""
    return step(ctx, state)


def close(awaitable: object) -> None:
    """Close a step that will never be resumed, so its `finally` blocks run now."""
    closer = getattr(awaitable, "close", None)
    if callable(closer):
        closer()


class MachineSteps:
    """The steps of one group's machines: started after their round commits, one per machine.

    A step runs inline until its first real wait (`StepRunner`); only a step that waits gets
    a Task. What a step sends is planned once it returns (`MachineRuntime.step_released`).
    """

    def __init__(
        self,
        runtime: MachineRuntime,
        records: GroupRecords[Any],
        committer: Committer,
        *,
        eager: bool = True,
        shared: bool = False,
    ) -> None:
        self._runtime = runtime
        #: Steps only read their state (`StateGroup(shared_state=True)`): the machine keeps it.
        self._shared = shared
        self._records = records
        self._committer = committer
        self._begin_step = StepRunner().run if eager else call
        self._context = contextvars.Context()
        #: Steps running in a Task (inline steps finish before anyone could count them).
        self.running = 0

    def bind_context(self) -> None:
        """Run steps in copies of the current context from now on, as Tasks made here would."""
        self._context = contextvars.copy_context()

    def start(self, m: Machine, step: Step) -> None:
        """Start the step its committed round planned (skipped if a cancel came meanwhile)."""
        runtime = self._runtime
        if m.cancel_requested:
            # A cancelling event arrived while this round was being committed: skip the step.
            m.cancel_requested = False
            runtime.settle(m)
            return
        ctx = Context(runtime, m, m.gen)
        context = self._context.copy()
        m.stepping = True  # events the step sends wait until it returns
        # The step gets the machine's state object itself, and the machine lets go of it and
        # of its record: the record its round just committed is the state, read back and
        # decoded only when the machine is planned next (`MachineRuntime._read_back`). Nothing
        # the step does to its state can leak into the persisted one, and a machine in flight
        # keeps one decoded state in memory and no encoded one. Steps that only read their
        # state share it with the machine instead, which then plans from it with no read-back
        # (keeping what its next record can reuse: see fsm/tail.py).
        state = m.state
        if m.tail is not None:
            let_go(m, self._shared)
        else:
            m.record = None
            if not self._shared:
                m.state = None
        try:
            pending = context.run(self._begin_step, step, ctx, state)
        except asyncio.CancelledError:
            pending = None  # the step cancelled itself before waiting, as a Task would end
        except Exception as exc:  # the step failed before it ever waited
            pending = None
            self._step_failed(m, exc)
        except BaseException:
            m.stepping = False
            m.cancel_requested = False
            runtime.settle(m)
            raise
        if pending is None:
            # Finished without waiting: no Task was needed.
            m.stepping = m.cancel_requested = False
            runtime.settle(m)
            return
        self.running += 1
        m.started = False
        m.step_coro = pending
        m.task = asyncio.get_running_loop().create_task(self._run_step(m, pending), context=context)
        if m.events:
            # It sent events before it waited; the runtime left the flush to its end.
            self._committer.request_flush()

    def cancel(self, m: Machine) -> None:
        """Ask the machine's step, or the step its committing round will start, to stop."""
        m.cancel_requested = True
        if m.task is not None and m.started:
            m.task.cancel()
        # Otherwise the step's task has not begun (or its round is still being committed):
        # `_run_step` (or the round's commit callback) sees the flag when it does.

    async def stop(self, machines: Iterable[Machine]) -> None:
        """Cancel every running step, wait for them, and close any left unreleased."""
        machines = list(machines)
        tasks = [m.task for m in machines if m.task is not None]
        for m in machines:
            if m.task is not None:
                self.cancel(m)
        await asyncio.gather(*tasks, return_exceptions=True)
        for m in machines:
            if m.step_coro is not None:  # (only if a task died without releasing its step)
                with contextlib.suppress(RuntimeError):
                    close(m.step_coro)
                m.step_coro = None
        self.running = 0

    def _step_failed(self, m: Machine, exc: BaseException) -> None:
        trace = "".join(traceback.format_exception(exc))
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: machine %r: step failed: %s", self._runtime.name, m.id, message)
        m.record_error(f"step failed: {message}")
        if self._runtime.active:
            failed = StepFailed(message[:MAX_ERROR], trace[-MAX_ERROR:])
            self._runtime.queue_step_event(m, failed)

    async def _run_step(self, m: Machine, pending: Awaitable[None]) -> None:
        m.started = True
        # `start` set `m.task` to this task before the loop could run it (and nothing else
        # replaces it while the step runs): on Python 3.11 `asyncio.current_task()` is plain
        # Python, and twice per step it cost about as much as the rest of this method.
        task = m.task
        if task is None:  # (a task factory that ran the coroutine inside `create_task`)
            task = asyncio.current_task()
        if m.cancel_requested and task is not None:
            if type(pending) is ResumedStep:
                # It ran up to its first wait already: cancel it there, as a Task would be.
                task.cancel()
            else:
                close(pending)  # it never ran: skip it altogether
                self._release_step(m, task)
                return
        try:
            await pending
        except asyncio.CancelledError:
            if not m.cancel_requested:
                raise
        except Exception as exc:
            self._step_failed(m, exc)
        finally:
            # Release right away, so what the step sent joins the batch being planned now.
            self._release_step(m, task)

    def _release_step(self, m: Machine, task: asyncio.Task[Any] | None) -> None:
        if task is None or m.task is not task:
            return  # already released
        m.task = None
        m.step_coro = None
        m.stepping = False
        m.cancel_requested = False
        self.running -= 1
        self._runtime.step_released(m)
