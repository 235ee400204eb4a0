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
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any

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


__all__ = ["ResumedStep", "StepRunner", "call", "close"]


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
        return self.send(None)

    def send(self, value: Any) -> Any:
        """Resume the coroutine (the first call re-yields what it suspended on)."""
        if self._primed:
            self._primed = False
            first, self._first = self._first, None
            return first
        return self._finished_or(self._driver.send(value))

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
