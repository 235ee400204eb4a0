"""Scale: 1,000 sectors sealed concurrently by one engine on a virtual clock.

Simulated time passes as fast as the engine can go; the sectors share the scheduler, the sim worker,
the precommit batcher and the commit aggregator, and the devnet executes their messages.
The wall time is printed, not asserted (it depends on the machine).
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import pytest

from sectorfsm.sealing.chain import ExitCode
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.states import SectorState

N = 1000


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_thousand_sectors_seal_concurrently_on_virtual_time(tmp_path: Path) -> None:
    async def main() -> None:
        t0 = time.monotonic()
        async with Miner.open(tmp_path / "repo", clock="virtual") as m:
            start = m.clock.now()
            numbers = await asyncio.gather(*(m.pledge() for _ in range(N)))
            pledged = time.monotonic() - t0
            assert sorted(numbers) == list(range(1, N + 1))
            # Each sector awaited on its own, as a user would: a waiter wakes only for its own
            # sector's commits (not for every commit of the thousand).
            infos = await asyncio.wait_for(
                asyncio.gather(*(m.wait(n, "Proving") for n in numbers)), timeout=150
            )
            assert [i.number for i in infos] == numbers
            await asyncio.wait_for(m.idle(), timeout=30)
            sealed = time.monotonic() - t0
            simulated = m.clock.now() - start

            states = collections.Counter(info.state for info in m.list())
            assert states == {SectorState.Proving: N}, states
            assert len(list(m.list(states=["Proving"]))) == N
            assert m.sector_counts()["Proving"] == N
            assert m.chain.active_sectors() == list(range(1, N + 1))

            messages = m.chain.messages()
            pre = [(c, meth, ns) for c, meth, ns in messages if meth.startswith("PreCommit")]
            prove = [(c, meth, ns) for c, meth, ns in messages if meth.startswith("ProveCommit")]
            assert len(pre) + len(prove) == len(messages), {meth for _, meth, _ in messages}
            # Each sector is named by exactly one precommit and one prove-commit, both Ok.
            for family in (pre, prove):
                named = collections.Counter(n for _, _, ns in family for n in ns)
                assert named == dict.fromkeys(range(1, N + 1), 1)
                for cid, _, _ in family:
                    receipt = m.chain.search_msg(cid)
                    assert receipt is not None and receipt.exit_code is ExitCode.Ok, (cid, receipt)
            # Batched: far fewer messages than sectors, none above the configured maximum.
            assert len(pre) < N and len(prove) < N, (len(pre), len(prove))
            assert max(len(ns) for _, _, ns in pre) <= m.config.max_pre_commit_batch
            assert max(len(ns) for _, _, ns in prove) <= m.config.max_commit_batch

            # No event applied twice, and every sector took the same (happy) path.
            paths = collections.Counter(tuple(e.kind for e in info.log) for info in m.list())
            assert len(paths) == 1, paths.most_common(3)
            [path] = paths
            assert len(path) == len(set(path)), path
            assert all(kind.startswith("event;") for kind in path), path

            print(
                f"\n{N} sectors: pledged in {pledged:.2f}s, all Proving after {sealed:.2f}s "
                f"wall ({simulated:.0f} simulated seconds); "
                f"{len(pre)} precommit messages {[len(ns) for _, _, ns in pre]}, "
                f"{len(prove)} prove-commit messages {[len(ns) for _, _, ns in prove]}"
            )

    asyncio.run(main())
