"""Engine costs that must not grow with the number of machines (issue: scale)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fsmtoy import Add, Open, make_group

from sectorfsm.fsm import LmdbStore


def test_nosync_commits_run_on_the_loop_thread(tmp_path: Path) -> None:
    """No fsync to overlap: a `nosync` commit costs no hand-off to a writer thread and back."""

    async def body() -> list[bool]:
        store = LmdbStore(tmp_path / "s", durability="nosync")
        on_loop: list[bool] = []
        store.committer.observe_commits(
            lambda _s: on_loop.append(threading.current_thread() is threading.main_thread())
        )
        group = make_group(store)
        await group.start()
        try:
            await group.send("a", Open())
            for uid in range(5):
                await group.send("a", Add(uid))
        finally:
            await group.stop()
            store.close()
        return on_loop

    on_loop = asyncio.run(body())
    assert on_loop and all(on_loop), on_loop
