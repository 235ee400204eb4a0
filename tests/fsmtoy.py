"""The toy domains of the engine tests, and the spies that watch an engine run.

* Counters (`Counter`, `make_group`): machines that step through a few states.
* Records (`Rec`, `make_rec_group`): a plain dataclass whose steps are given per test.
* Jobs (`Job`, `job_group`): steps that send results late, for superseded-step tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from sectorfsm.fsm import Context, LmdbStore, MachineId, Restart, StateGroup, StepFailed, Terminated


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
    """The counters' planner, its steps reporting to `probe`."""

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
    """Closed counters are final."""
    return st.state == "Closed"


def make_group(store: LmdbStore, probe: Probe | None = None, **kw: Any) -> StateGroup[Counter]:
    """A counters group; `probe` records what its steps saw."""
    probe = probe or Probe()
    kw.setdefault("final", is_final)
    kw.setdefault("creating", [Open])
    kw.setdefault("cancelling", [Cancel])
    return StateGroup(store, "counters", make_planner(probe), Counter, events=EVENTS, **kw)


def copy_state(st: Counter) -> Counter:
    """A copy sharing no list with `st`."""
    return dataclasses.replace(st, applied=list(st.applied), batches=list(st.batches))


# -- records: a plain dataclass, steps given per test ----------------------------------------


@dataclass
class Rec:
    """A plain dataclass (no slots, no __post_init__): the codec's fast paths apply to it."""

    phase: str = "idle"
    seen: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hops: int = 0
    restarts: int = 0
    #: Whatever a test's `on_go` puts there (a value msgpack cannot encode, say).
    extra: Any = None


@dataclass(frozen=True, slots=True)
class Go:
    """Run the step registered under `tag`."""

    tag: str


@dataclass(frozen=True, slots=True)
class Note:
    uid: int


@dataclass(frozen=True, slots=True)
class Hop:
    """One more link of a chain: runs the step registered under "hop"."""


@dataclass(frozen=True, slots=True)
class Halt:
    """A cancelling event."""


REC_EVENTS: list[type] = [Go, Note, Hop, Halt]
StepFn = Callable[[Context, Rec], Awaitable[None] | None]


def make_rec_group(
    store: LmdbStore,
    steps: dict[str, StepFn],
    *,
    name: str = "hot",
    on_go: Callable[[Go, Rec], None] | None = None,
    sightings: list[int] | None = None,
    **kw: Any,
) -> StateGroup[Rec]:
    """A group whose planner runs `steps[tag]` (if any) on `Go(tag)`, then `on_go(ev, state)`,
    and records everything else."""

    def planner(events: list[Any], st: Rec) -> tuple[Any, int]:
        step: StepFn | None = None
        for ev in events:
            if isinstance(ev, Go):
                st.phase = ev.tag
                step = steps.get(ev.tag)
                if on_go is not None:
                    on_go(ev, st)
            elif isinstance(ev, Note):
                st.seen.append(ev.uid)
                if sightings is not None:
                    sightings.append(ev.uid)
            elif isinstance(ev, Hop):
                st.hops += 1
                step = steps.get("hop")
            elif isinstance(ev, StepFailed):
                st.errors.append(ev.error)
                step = None
            elif isinstance(ev, Halt):
                st.phase = "halted"
                step = None
            elif isinstance(ev, Restart):
                st.restarts += 1
                step = None
        return step, len(events)

    kw.setdefault("cancelling", [Halt])
    return StateGroup(store, name, planner, Rec, events=REC_EVENTS, **kw)


def state(g: StateGroup[Rec], mid: MachineId) -> Rec:
    """The committed state of a machine that must exist."""
    st = g.get(mid)
    assert st is not None, f"machine {mid!r} is missing"
    return st


def pending_on_disk(g: StateGroup[Any], mid: MachineId) -> int:
    """How many events of the machine wait in its inbox on disk."""
    info = g.info(mid)  # a fresh read transaction: only what was committed
    assert info is not None
    return info.pending_events


class TaskCounter:
    """Records every Task created on the loop (installed as its task factory)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def install(self) -> None:
        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
        ) -> asyncio.Task[Any]:
            self.names.append(getattr(coro, "__qualname__", type(coro).__name__))
            return asyncio.Task(coro, loop=loop, **kw)

        asyncio.get_running_loop().set_task_factory(factory)

    def uninstall(self) -> None:
        """Stop counting (`asyncio.run` creates tasks of its own while shutting down)."""
        asyncio.get_running_loop().set_task_factory(None)

    @property
    def step_tasks(self) -> int:
        """Tasks the engine created to finish a step (`MachineSteps._run_step`)."""
        return sum(1 for n in self.names if n.endswith("._run_step"))


class InboxSpy:
    """Sees the inbox as every write transaction leaves it (wraps `store.write`).

    Looking at the result rather than at `put` calls keeps this independent of how the
    committer writes (put, putmulti, ...): a staged inbox put shows up as an entry.
    """

    def __init__(self, store: LmdbStore, monkeypatch: pytest.MonkeyPatch) -> None:
        inbox = store.db("inbox")
        #: Every inbox key present at the end of some write transaction, and the count of
        #: those transactions.
        self.keys: set[bytes] = set()
        self.commits = 0
        real = store.write

        def write(fn: Callable[[Any], Any]) -> Any:
            def spied(txn: Any) -> Any:
                result = fn(txn)
                self.commits += 1
                self.keys.update(key for key, _ in txn.cursor(db=inbox))
                return result

            return real(spied)

        monkeypatch.setattr(store, "write", write)


# -- jobs: steps whose results arrive late ---------------------------------------------------


@dataclass(slots=True)
class Job:
    phase: str = ""
    results: list[str] = field(default_factory=list)
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Begin:
    tag: str
    results: int = 1  # how many results its step sends before it waits on the gate


@dataclass(frozen=True, slots=True)
class Result:
    tag: str


def job_group(store: LmdbStore, gate: asyncio.Event, ctxs: list[Context]) -> StateGroup[Job]:
    """Jobs whose step sends `results - 1` results, waits on `gate`, then sends the last."""

    def step_for(tag: str, results: int) -> Any:
        async def step(ctx: Context, st: Job) -> None:
            ctxs.append(ctx)
            for i in range(results - 1):
                ctx.send(Result(f"{tag}{i}"))
            await gate.wait()
            ctx.send(Result(tag))

        return step

    def planner(events: list[Any], st: Job) -> tuple[Any, int]:
        for i, ev in enumerate(events):
            if isinstance(ev, Begin):
                st.phase = ev.tag
                return step_for(ev.tag, ev.results), i + 1
            if isinstance(ev, Result):
                st.results.append(ev.tag)
                if ev.tag.endswith("0"):  # a0 moves the job on: a new step
                    return step_for(f"{ev.tag}+", 1), i + 1
                continue
            if isinstance(ev, Restart):
                st.restarts += 1
                return step_for(st.phase, 1), i + 1
        return None, len(events)

    return StateGroup(store, "jobs", planner, Job, events=[Begin, Result])
