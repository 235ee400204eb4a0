"""A small domain used by the engine tests: counters that step through a few states."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sectorfsm.fsm import Context, LmdbStore, Restart, StateGroup, StepFailed, Terminated


@dataclass(slots=True)
class Counter:
    state: str = "Idle"
    total: int = 0
    applied: list[int] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    restarts: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Add:
    uid: int
    amount: int = 1


@dataclass(frozen=True, slots=True)
class Work:
    """Ask the machine to run a step that sleeps `seconds` on the group clock."""

    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Crash:
    """Ask the machine to run a step that raises."""


@dataclass(frozen=True, slots=True)
class Bad:
    """An event the planner does not accept in any state."""


@dataclass(frozen=True, slots=True)
class Finish:
    """Moves the machine to the final state Closed."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Raises Terminated in the planner."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """A cancelling event: interrupts a running step."""


@dataclass(frozen=True, slots=True)
class Open:
    """A creating event: makes a machine if the id is unknown."""


EVENTS: list[type] = [Add, Work, Done, Crash, Bad, Finish, Stop, Cancel, Open]


class Probe:
    """Records what the steps saw, for assertions."""

    def __init__(self) -> None:
        self.running: dict[Any, int] = {}
        self.max_per_machine = 0
        self.max_total = 0
        self.total = 0
        self.cancelled: list[Any] = []
        self.plans = 0
        self.steps_started: list[tuple[Any, str]] = []
        self._waiters: list[asyncio.Event] = []

    def step_began(self, machine_id: Any, state: str) -> None:
        """Record a step start and wake whoever waits in `started`."""
        self.steps_started.append((machine_id, state))
        for woken in self._waiters:
            woken.set()
        self._waiters.clear()

    async def started(self, machine_id: Any, count: int = 1) -> None:
        """Wait until `count` steps of `machine_id` have started."""
        while sum(1 for m, _ in self.steps_started if m == machine_id) < count:
            woken = asyncio.Event()  # made here: a Probe outlives the loops of some tests
            self._waiters.append(woken)
            await woken.wait()


def make_planner(probe: Probe) -> Any:
    async def work_step(ctx: Context, st: Counter, seconds: float) -> None:
        probe.step_began(ctx.id, st.state)
        probe.running[ctx.id] = probe.running.get(ctx.id, 0) + 1
        probe.total += 1
        probe.max_per_machine = max(probe.max_per_machine, probe.running[ctx.id])
        probe.max_total = max(probe.max_total, probe.total)
        try:
            await ctx.clock.sleep(seconds)
        except asyncio.CancelledError:
            probe.cancelled.append((ctx.id, ctx.cancelled))
            raise
        finally:
            probe.running[ctx.id] -= 1
            probe.total -= 1
        ctx.send(Done())

    async def crash_step(ctx: Context, st: Counter) -> None:
        raise RuntimeError(f"disk on fire in {st.state}")

    def planner(events: list[Any], st: Counter) -> tuple[Any, int]:
        probe.plans += 1
        st.batches.append(len(events))
        step: Any = None
        for i, ev in enumerate(events):
            if isinstance(ev, Add):
                st.total += ev.amount
                st.applied.append(ev.uid)
            elif isinstance(ev, Restart):
                st.restarts += 1
                if st.state == "Working":
                    step = _bind(work_step, 0.0)
            elif isinstance(ev, Work):
                st.state = "Working"
                return _bind(work_step, ev.seconds), i + 1
            elif isinstance(ev, Done):
                st.state = "Idle"
            elif isinstance(ev, Crash):
                return crash_step, i + 1
            elif isinstance(ev, StepFailed):
                st.failures.append(ev.error)
                st.state = "Failed"
            elif isinstance(ev, Finish):
                st.state = "Closed"
            elif isinstance(ev, Stop):
                raise Terminated()
            elif isinstance(ev, Cancel):
                st.state = "Cancelled"
            elif isinstance(ev, Open):
                st.state = "Idle"
            else:
                raise ValueError(f"unexpected event {type(ev).__name__} in {st.state}")
        return step, len(events)

    return planner


def _bind(fn: Any, *args: Any) -> Any:
    async def step(ctx: Context, st: Counter) -> None:
        await fn(ctx, st, *args)

    return step


def is_final(st: Counter) -> bool:
    return st.state == "Closed"


def make_group(store: LmdbStore, probe: Probe | None = None, **kw: Any) -> StateGroup[Counter]:
    probe = probe or Probe()
    kw.setdefault("final", is_final)
    kw.setdefault("creating", [Open])
    kw.setdefault("cancelling", [Cancel])
    return StateGroup(store, "counters", make_planner(probe), Counter, events=EVENTS, **kw)


def copy_state(st: Counter) -> Counter:
    return dataclasses.replace(st, applied=list(st.applied), batches=list(st.batches))
