"""Devnet chain records: what a sent message stores is what a reopened chain reads back."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from sectorfsm.fsm import LmdbStore, VirtualClock
from sectorfsm.fsm.codec import unpackb
from sectorfsm.sealing.chain import ChainParams, PreCommitParams
from sectorfsm.sealing.devnet import DevnetChain


def test_a_sent_batch_is_stored_field_by_field_and_read_back(tmp_path: Path) -> None:
    async def body() -> None:
        clock = VirtualClock(start=1_600_000_000.0)
        batch = [
            PreCommitParams(n, 8, f"bagboea4b-sealed-{n}", 100 + n, (n, n + 1), 9_000, None)
            for n in (1, 2)
        ]
        async with LmdbStore(tmp_path / "store", durability="nosync") as store:
            chain = DevnetChain(store, clock, ChainParams.devnet(), miner=1000)
            cid = chain.send_precommits(batch, deposit=7)
            await store.committer.waiter()
            with store.read() as txn:
                record = unpackb(txn.get(b"msg/%012d" % 1, db=store.db("devnet")))
            sent = chain.messages()
        # (What `dataclasses.asdict` stored before: stores old and new read alike.)
        assert record["cid"] == cid and record["value"] == 7
        assert record["sectors"] == [1, 2]
        assert record["payload"] == [
            {**dataclasses.asdict(p), "deal_ids": list(p.deal_ids)} for p in batch
        ]
        async with LmdbStore(tmp_path / "store", durability="nosync") as store:
            again = DevnetChain(store, clock, ChainParams.devnet(), miner=1000)
            assert again.messages() == sent
            assert again.search_msg(cid) == chain.search_msg(cid)

    asyncio.run(body())
