"""Engine process for tests/test_sealing_crash.py: a real-clock miner on a fast devnet.

    python tests/sealing_proc.py --repo R --sectors 6 --deals 1      # first run: pledges
    python tests/sealing_proc.py --repo R --resume                   # after a kill: no pledge

Options not shown: --durability (group/sync/nosync), --time-scale, --block-time, ...

It opens the miner repo; unless `--resume` is given, it pledges `--sectors` CC sectors and
adds `--deals` deal pieces (placed into deal sectors as `Miner.add_piece` assigns them; the
first goes in second), staggered by `--stagger` seconds. Then it runs the engine until every
sector is Proving. The parent SIGKILLs it at random moments and starts it again with
`--resume`.

Everything it prints (one line each, flushed at once; the parent reads the file stdout is
redirected to):

* `ready <time>`: the engine runs (the miner is open).
* `pledged <n> <time>`: the pledge (or piece) that created sector `n` is durable.
* `allpledged <time>`: every sector of the first run exists.
* `state <time> <n> <State>`: sector `n` was seen in a new state (polled every 5 ms).
* `runs <json>`: the sim backend's task counts of THIS process, before it exits cleanly.
* `done <time>`: every sector is Proving; the miner was closed cleanly.

Times are `time.monotonic()`, which is system-wide on Linux, so the parent can compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from sectorfsm.sealing import commp
from sectorfsm.sealing.chain import ChainParams
from sectorfsm.sealing.miner import Miner
from sectorfsm.sealing.states import SectorState


def say(*words: object) -> None:
    print(*words, flush=True)


async def watch(m: Miner, seen: dict[int, SectorState]) -> None:
    """Print each state change; return once there are sectors and all are Proving."""
    while True:
        now = time.monotonic()
        for info in m.list():
            if seen.get(info.number) is not info.state:
                seen[info.number] = info.state
                say("state", f"{now:.4f}", info.number, info.state.name)
        if seen and all(s is SectorState.Proving for s in seen.values()):
            return
        await asyncio.sleep(0.005)


async def pledge(m: Miner, args: Any) -> None:
    deals_at = {1 + i * 2 for i in range(args.deals)}  # interleave deal sectors with CC ones
    total = args.sectors + args.deals
    for i in range(total):
        if i:
            await asyncio.sleep(args.stagger)
        if i in deals_at:
            data = f"sealing_proc deal piece {i} ".encode() * 3  # <= 127 bytes: padded 128
            n = await m.add_piece(commp.piece_cid(data), commp.padded_size(127))
        else:
            n = await m.pledge()
        say("pledged", n, f"{time.monotonic():.4f}")
    say("allpledged", f"{time.monotonic():.4f}")


async def main(args: Any) -> int:
    chain = ChainParams.devnet(block_time=args.block_time)
    config = {"wait_deals_delay": args.wait_deals}
    async with Miner.open(
        args.repo,
        clock="real",
        chain=chain,
        config=config,
        sim_time_scale=args.time_scale,
        durability=args.durability,
    ) as m:
        existing = sum(1 for _ in m.list())
        say("ready", f"{time.monotonic():.4f}")
        if args.resume and not existing:
            say("error: --resume on a repo without sectors")
            return 2
        if not args.resume and existing:
            say(f"error: the repo already has {existing} sectors; pass --resume")
            return 2
        seen: dict[int, SectorState] = {}
        watcher = asyncio.ensure_future(watch(m, seen))
        if not args.resume:
            await pledge(m, args)
        await asyncio.wait_for(watcher, args.max_seconds)
        backend = m.sealer.backend
        say("runs", json.dumps({t.name: c for t, c in getattr(backend, "runs", {}).items()}))
    say("done", f"{time.monotonic():.4f}")
    return 0


def parse(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser()
    p.add_argument("--repo", required=True)
    p.add_argument("--sectors", type=int, default=4, help="CC sectors to pledge")
    p.add_argument("--deals", type=int, default=1, help="deal pieces to add (one sector each)")
    p.add_argument("--stagger", type=float, default=0.1)
    p.add_argument("--block-time", type=float, default=0.05)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--wait-deals", type=float, default=0.3, help="wait_deals_delay, seconds")
    p.add_argument("--durability", default="group", choices=["group", "sync", "nosync"])
    p.add_argument("--resume", action="store_true", help="do not pledge (after a kill)")
    p.add_argument("--max-seconds", type=float, default=60.0)  # never outlive a lost parent
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
