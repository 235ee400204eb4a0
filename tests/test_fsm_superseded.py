"""Superseded steps: a step's results never reach a state it was not meant for.

Once a round starts another step (or makes the machine final), what the previous step sent
that is still queued is dropped, and so is what it sends later, across a restart too.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from conftest import run
from fsmtoy import Begin, Job, Result, job_group

from sectorfsm.fsm import Context, LmdbStore


def test_a_superseded_steps_results_are_dropped_now_and_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        ctxs: list[Context] = []
        async with LmdbStore(tmp_path) as store:
            g = job_group(store, gate, ctxs)
            await g.start()
            await g.begin(1, Job())
            await g.send(1, Begin("a"))
            await g.send(1, Begin("b"))  # queued behind step a, ahead of its result
            gate.set()
            await g.idle()
            # Begin b superseded step a: its result, queued behind, was dropped.
            st = g.get(1)
            assert st is not None and st.phase == "b" and st.results == ["b"]
            first = ctxs[0]
            assert first.superseded and not ctxs[-1].superseded
            first.send(Result("late"))  # a callback of step a, long after
            await g.idle()
            st = g.get(1)
            assert st is not None and st.results == ["b"]
            info = g.info(1)
            assert info is not None and info.pending_events == 0 and info.last_error is None
            await g.stop()

    with caplog.at_level(logging.INFO, logger="sectorfsm.fsm"):
        run(main)
    stale = [r.getMessage() for r in caplog.records if "superseded" in r.getMessage()]
    assert len(stale) == 2 and all("dropped Result" in m for m in stale)


def test_a_superseded_steps_results_are_dropped_after_a_crash_too(tmp_path: Path) -> None:
    async def first() -> None:
        store = LmdbStore(tmp_path)
        g = job_group(store, asyncio.Event(), [])
        await g.start()
        await g.begin(1, Job())
        await g.send(1, Begin("a", results=3))  # sends a0 and a1, then waits for ever
        await store.committer.flush()
        info = g.info(1)
        assert info is not None and info.pending_events == 2  # a0, a1 on disk
        store.close()  # a crash: no stop(), no flush

    async def second() -> None:
        gate = asyncio.Event()
        ctxs: list[Context] = []
        async with LmdbStore(tmp_path) as store:
            g = job_group(store, gate, ctxs)
            await g.start()
            # a0 applied (it starts the next step), a1 superseded by that step, and the
            # Restart behind them already served: it starts no second step.
            gate.set()
            await g.idle()
            st = g.get(1)
            assert st is not None and st.results == ["a0", "a0+"] and st.restarts == 0
            assert len(ctxs) == 1
            info = g.info(1)
            assert info is not None and info.pending_events == 0
            await g.stop()

    run(first)
    run(second)
