#!/usr/bin/env python
"""Scale benchmark: N 32 GiB CC sectors to Proving on virtual time, each awaited with `wait`.

Run ``python bench/bench_scale.py --quick`` (N = 1k, 10k, 100k) or ``--sizes 1000,5000``.
Each N runs in a fresh subprocess, so its peak RSS is its own. Progress goes to stderr; the
last line of stdout is one JSON object with every figure (bench/README.md, "Scale").

The engine runs as a user would drive it: `Miner.open(clock="virtual", sealer="sim",
durability="nosync", sector_size="32GiB", chain="mainnet")` on one simulated worker with
`ignore_resources` (so every sector seals in parallel), `pledge()` per sector, then one
`Miner.wait(n, "Proving")` per sector. The N pledges are spread evenly over `--spread`
simulated seconds (one day by default): sectors are at every stage at once and their
transitions land in many different commits, as on a real miner; `--spread 0` pledges them all
at once (they then move in lock-step, in a few dozen commits).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUICK_SIZES = (1_000, 10_000, 100_000)


def _worker() -> Any:
    from sectorfsm.sched import StoragePath, WorkerResources, WorkerSpec

    return WorkerSpec(
        name="big",
        resources=WorkerResources(
            cpus=1 << 20, mem_physical=1 << 60, gpus=("sim-gpu",), ignore_resources=True
        ),
        paths=(StoragePath("big-path", "big", 1 << 62, can_seal=True, can_store=True),),
        needs_heartbeats=False,
    )


class _GcTimer:
    """Collections per generation and the seconds they took (a `gc.callbacks` entry)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._start


async def _run(n: int, repo: Path, spread: float) -> dict[str, Any]:
    from sectorfsm.sealing.miner import Miner

    gc_timer = _GcTimer()
    gc.callbacks.append(gc_timer)
    t0 = time.perf_counter()
    c0 = time.process_time()
    async with Miner.open(
        repo,
        clock="virtual",
        sealer="sim",
        durability="nosync",
        sector_size="32GiB",
        chain="mainnet",
        workers=[_worker()],
        config={"max_sealing_sectors": 0},
    ) as m:
        start_v = m.clock.now()
        commits0 = m.store.committer.batches_committed
        waits: list[asyncio.Task[int]] = []

        async def logged(number: int) -> int:
            # Only its log's length is kept: 100k results (a log of 14 entries each) held to
            # the end would be the benchmark's memory, not the engine's.
            return len((await m.wait(number, "Proving")).log)

        step = spread / n
        for i in range(n):
            # (A pledge plan at a constant rate: sectors are at every stage at once, so their
            # transitions land in many different commits, as on a real miner.)
            await m.clock.sleep_until(start_v + i * step)
            k = await m.pledge()
            waits.append(asyncio.create_task(logged(k)))
        pledged = time.perf_counter() - t0
        transitions = sum(await asyncio.gather(*waits))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        simulated = m.clock.now() - start_v
        commits = m.store.committer.batches_committed - commits0
        counts = {k: v for k, v in m.sector_counts().items() if v}
    gc.callbacks.remove(gc_timer)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "wall_s": round(wall, 2),
        "pledge_s": round(pledged, 2),
        "transitions": transitions,
        "transitions_per_s": round(transitions / wall),
        "per_sector_ms": round(wall / n * 1000, 3),
        "cpu_s": round(cpu, 2),
        "per_sector_cpu_ms": round(cpu / n * 1000, 3),
        "peak_rss_mb": round(rss_mb, 1),
        # The cyclic collector's share of `cpu_s`, per generation (young, middle, full).
        "gc_s": [round(s, 2) for s in gc_timer.seconds],
        "gc_collections": gc_timer.count,
        "simulated_h": round(simulated / 3600, 2),
        "commits": commits,
        "pledge_spread_s": spread,
        "counts": counts,
    }


def child(n: int, spread: float, profile: str | None) -> None:
    """Run one N in this process and print its figures as one JSON line."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            out = prof.runcall(asyncio.run, _run(n, tmp / "repo", spread))
            prof.dump_stats(profile)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        else:
            out = asyncio.run(_run(n, tmp / "repo", spread))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out), flush=True)


def main() -> None:
    """Run each N in a fresh subprocess and print the figures and the per-sector ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1k, 10k, 100k")
    ap.add_argument("--sizes", help="comma-separated N (overrides --quick)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="(with one size) write a cProfile dump here")
    ap.add_argument(
        "--spread", type=float, default=86_400.0, help="simulated seconds to pledge N over"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per N")
    ap.add_argument(
        "--simulate",
        action="store_true",
        help="instead: simulate_30d_100w_s, `sectors simulate` on bench/cluster-100w.toml",
    )
    args, rest = ap.parse_known_args()
    if args.simulate:  # (its own options follow: --days, --config, --profile; see its --help)
        from scale_simulate import main as simulate_main

        simulate_main(rest + (["--profile", args.profile] if args.profile else []))
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.child is not None:
        child(args.child, args.spread, args.profile)
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES)
    runs: list[dict[str, Any]] = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--spread", str(args.spread)]
        if args.profile:
            cmd += ["--profile", args.profile]
        print(f"N={n} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # (subprocess.run kills the child)
            print(f"N={n}: over {args.timeout:.0f} s, stopped", file=sys.stderr)
            runs.append({"n": n, "timeout_s": args.timeout})
            break
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"N={n}: child exited {proc.returncode}")
        if args.profile:
            sys.stderr.write(proc.stderr)
        fig = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(fig)
        print(
            f"N={n}: {fig['wall_s']} s wall, {fig['transitions_per_s']} transitions/s, "
            f"{fig['per_sector_ms']} ms/sector ({fig['per_sector_cpu_ms']} ms CPU), "
            f"peak RSS {fig['peak_rss_mb']} MB, GC {sum(fig['gc_s']):.2f} s",
            file=sys.stderr,
            flush=True,
        )
    done = [r for r in runs if "per_sector_ms" in r]
    out: dict[str, Any] = {"runs": runs}
    if len(done) >= 2:
        out["per_sector_ratio"] = round(done[-1]["per_sector_ms"] / done[0]["per_sector_ms"], 3)
        out["per_sector_cpu_ratio"] = round(
            done[-1]["per_sector_cpu_ms"] / done[0]["per_sector_cpu_ms"], 3
        )
        out["ratio_of"] = f"{done[-1]['n']}/{done[0]['n']}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
