"""Client writes through the mailbox, and the clocks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD, eventually
from fsmtoy import Add, Counter, Open, make_group

from sectorfsm.fsm import (
    LmdbStore,
    MachineExistsError,
    RealClock,
    UnknownMachineError,
    VirtualClock,
)

# -- mailbox: a not-started group is a client ----------------------------------------------


def test_client_writes_wait_durably_for_the_next_engine(tmp_path: Path) -> None:
    async def client() -> None:
        async with LmdbStore(tmp_path) as store:
            c = make_group(store)
            await c.begin(1, Counter())
            await c.send(1, Add(uid=1))
            await c.send(2, Open())  # creating event: makes machine 2
            with pytest.raises(UnknownMachineError):
                await c.send(3, Add(uid=3))
            with pytest.raises(MachineExistsError):
                await c.begin(1, Counter())
            info = c.info(1)
            assert info is not None and info.state.applied == []  # not applied: no engine yet

    async def engine() -> None:
        async with LmdbStore(tmp_path) as store:
            g = make_group(store)
            await g.start()
            await g.idle()
            st1, st2 = g.get(1), g.get(2)
            assert st1 is not None and st1.applied == [1]
            assert st2 is not None and st2.state == "Idle"
            assert not g.has(3)
            with store.read() as txn:
                assert txn.stat(store.db("mailbox"))["entries"] == 0
            await g.stop()

    asyncio.run(client())
    asyncio.run(engine())


def test_running_engine_picks_up_client_writes(tmp_path: Path) -> None:
    async def main() -> None:
        async with LmdbStore(tmp_path) as store:
            engine = make_group(store, poll_interval=0.1)
            client = make_group(store)  # same name, never started: writes to the mailbox
            await engine.start()
            await engine.begin(1, Counter())
            for uid in range(10):
                await client.send(1, Add(uid=uid))

            def applied() -> list[int] | None:
                st = engine.get(1)
                assert st is not None
                return st.applied if len(st.applied) == 10 else None

            got = await eventually(applied, "the engine applying the client's 10 events")
            assert got == list(range(10)), "mailbox order must be kept"
            await engine.stop()

    asyncio.run(main())


# -- clocks ----------------------------------------------------------------------------------


def test_virtual_clock_jumps_only_when_everything_waits() -> None:
    clock = VirtualClock(start=0.0)
    order: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        order.append((name, clock.now()))

    async def busy() -> None:
        # Real work on the loop (many yields) must finish before time moves.
        for _ in range(200):
            await asyncio.sleep(0)
        order.append(("busy", clock.now()))

    async def main() -> None:
        await asyncio.gather(sleeper("b", 7200), sleeper("a", 3600), busy(), sleeper("c", 3600))

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 60  # far below the 2 hours a real clock would take
    assert order == [("busy", 0.0), ("a", 3600.0), ("c", 3600.0), ("b", 7200.0)]


def test_virtual_clock_waits_for_holds() -> None:
    clock = VirtualClock(start=0.0)
    seen: list[float] = []

    async def main() -> None:
        clock.hold()

        async def later() -> None:
            await clock.sleep(10)
            seen.append(clock.now())

        task = asyncio.create_task(later())
        await asyncio.sleep(0.05)
        assert seen == [] and clock.now() == 0.0, "time moved while the clock was held"
        clock.release()
        await task

    asyncio.run(main())
    assert seen == [10.0]


def test_virtual_clock_manual_advance_and_cancelled_sleepers() -> None:
    clock = VirtualClock(start=100.0, auto_advance=False)

    async def main() -> None:
        fired: list[str] = []

        async def sleeper(name: str, s: float) -> None:
            await clock.sleep(s)
            fired.append(name)

        a = asyncio.create_task(sleeper("a", 5))
        b = asyncio.create_task(sleeper("b", 50))
        await asyncio.sleep(0)
        b.cancel()
        clock.advance(10)
        await asyncio.sleep(0)
        await a
        assert fired == ["a"] and clock.now() == 110.0
        assert clock.pending_timers == 0

    asyncio.run(main())


@pytest.mark.parametrize("seconds", [0.0, -5.0, float("nan"), 1e-300], ids=str)
def test_virtual_sleep_of_no_time_only_yields(seconds: float) -> None:
    """A sleep that cannot move the clock (1e-300 s after 1.6e9 is the same float) yields once.

    It neither waits for the loop to go idle nor makes time jump, as `asyncio.sleep(0)`.
    """
    clock = VirtualClock(start=1_600_000_000.0, auto_advance=False)

    async def main() -> None:
        # (no advance(): a timer never fires)
        await asyncio.wait_for(clock.sleep(seconds), HANG_GUARD)
        if seconds == seconds:  # (`sleep_until(nan)` waits for a timer that never fires)
            await asyncio.wait_for(clock.sleep_until(clock.now() + seconds), HANG_GUARD)

    asyncio.run(main())
    assert clock.now() == 1_600_000_000.0 and clock.pending_timers == 0


def test_real_clock() -> None:
    clock = RealClock()
    assert abs(clock.now() - time.time()) < 1

    async def main() -> float:
        t0 = time.monotonic()
        await clock.sleep(0.05)
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.04


def test_two_virtual_clocks_on_one_loop_both_advance() -> None:
    """Each clock's wait for idleness must not count the other's: they used to spin for ever."""

    async def main() -> None:
        a, b = VirtualClock(start=0.0), VirtualClock(start=0.0)
        # (wait_for is a hang guard only: both sleeps end at once in real time)
        await asyncio.wait_for(asyncio.gather(a.sleep(3600), b.sleep(7200)), HANG_GUARD)
        assert (a.now(), b.now()) == (3600.0, 7200.0)

    asyncio.run(main())
