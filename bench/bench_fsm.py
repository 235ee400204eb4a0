#!/usr/bin/env python
"""Benchmark of the persisted FSM engine against the physical limit of its storage design.

Run ``python bench/bench_fsm.py [--quick]``. Progress goes to stderr; the last line of stdout is
one JSON object with every figure (see bench/README.md for what each one means). Throughput is
reported as a ratio against a raw-LMDB baseline measured in the same run, because the machines
this runs on are noisy.

Phases:

1. ``engine_group_tps``: 10,000 live machines in ``durability="group"``; every step sends the
   machine its next event until it has made K transitions.
2. ``raw_lmdb_tps``: a plain loop doing only the store work of a transition (put the event,
   delete it, put the new state) on a fresh LMDB env opened like `LmdbStore`, committing fsynced
   batches of the size the engine's group commits had.
3. ``engine_sync_tps`` / ``raw_lmdb_sync_tps``: the same in ``durability="sync"`` against one
   fsynced commit per transition.
4. ``restart_s``: open and resume a store of 1,000,000 sectors, 1,000 live, in a fresh process.
5. ``rss_mb_per_100k_dormant``: RSS growth per 100k dormant machines between two store sizes.

The machines, their planner and the raw-LMDB loop live in bench/fsm_workload.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
from fsm_workload import (
    FINAL_STATUS,
    GROUP,
    MAP_SIZE,
    STATUSES,
    Advance,
    ChainWorkload,
    RestartWorkload,
    SectorState,
    is_final,
    raw_lmdb_run,
)

from sectorfsm.fsm import LmdbStore, StateGroup
from sectorfsm.fsm.store import Durability

_T0 = time.perf_counter()


# -- helpers ------------------------------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def chunks(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(n, lo + size))


def memory_mb() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in MiB (getrusage if no /proc)."""
    wanted = {
        "VmRSS": "rss_mb",
        "RssAnon": "rss_anon_mb",
        "RssFile": "rss_file_mb",
        "VmHWM": "hwm_mb",
    }
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in wanted:
                    out[wanted[name]] = round(int(rest.split()[0]) / 1024, 2)
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"rss_mb": round(peak, 2), "hwm_mb": round(peak, 2)}
    return out


def drop_page_cache(store_dir: Path) -> None:
    """Evict the store file from the page cache (clean pages only; needs no privileges).

    A file just written by another process sits in the page cache in large folios (ext4 on
    Linux >= 6.16), and a single read fault maps a whole folio, so RssFile would count
    neighbouring pages the engine never touched. After this, faults map what is read.
    """
    data = store_dir / "data.mdb"
    if not data.exists() or not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- 1. engine throughput -----------------------------------------------------------------------


@dataclass
class EngineRun:
    durability: str
    machines: int
    k: int
    transitions: int
    elapsed_s: float
    begin_s: float
    batches: int
    transactions: int

    @property
    def tps(self) -> float:
        return self.transitions / self.elapsed_s

    @property
    def per_commit(self) -> float:
        return self.transitions / max(1, self.batches)


async def _engine_run(
    path: Path,
    durability: Durability,
    machines: int,
    k: int,
    plain_steps: bool = False,
    gc_freeze: bool = False,
    eager_steps: bool = True,
) -> EngineRun:
    store = LmdbStore(path, durability)
    workload = ChainWorkload(k, plain_steps)
    group = StateGroup(
        store, GROUP, workload.planner, SectorState, events=[Advance], eager_steps=eager_steps
    )
    await group.start()
    try:
        t = time.perf_counter()
        for ids in chunks(machines, 2000):
            await asyncio.gather(*(group.begin(i, SectorState()) for i in ids))
        await group.idle()
        begin_s = time.perf_counter() - t
        committer = store.committer
        gc.collect()
        if gc_freeze:
            gc.freeze()  # what a long-running host does after start-up
        batches0 = committer.batches_committed
        txns0 = int(getattr(committer, "transactions", committer.units_committed))
        t0 = time.perf_counter()
        # The measured phase: from the first event until everything is applied and durable.
        await asyncio.gather(*(group.send(i, Advance(1)) for i in range(machines)))
        await group.idle()
        elapsed = time.perf_counter() - t0
        batches = committer.batches_committed - batches0
        txns = int(getattr(committer, "transactions", committer.units_committed)) - txns0
        expected = machines * k
        if workload.applied != expected:
            raise RuntimeError(f"engine applied {workload.applied} transitions, not {expected}")
        for i in (0, machines // 2, machines - 1):
            got = group.get(i)
            if got is None or got.n != k:
                raise RuntimeError(f"machine {i} persisted {got!r}, expected n={k}")
    finally:
        if gc_freeze:
            gc.unfreeze()
        await group.stop()
        await store.aclose()
    return EngineRun(durability, machines, k, expected, elapsed, begin_s, batches, txns)


def engine_run(
    path: Path,
    durability: Durability,
    machines: int,
    k: int,
    plain_steps: bool = False,
    gc_freeze: bool = False,
    eager_steps: bool = True,
) -> EngineRun:
    return asyncio.run(
        _engine_run(path, durability, machines, k, plain_steps, gc_freeze, eager_steps)
    )


# -- 4./5. restart and memory --------------------------------------------------------------------


def build_store(path: Path, sectors: int, live: int) -> float:
    """Write `sectors` machine records (`live` of them non-final) with the engine's encoding."""
    t0 = time.perf_counter()
    # Records of ~60 bytes plus B-tree overhead: reserve enough map to never regrow mid-build.
    store = LmdbStore(path, "nosync", map_size=max(MAP_SIZE, sectors * 256))
    try:
        workload = RestartWorkload()
        group = StateGroup(store, GROUP, workload.planner, SectorState, final=is_final)
        dormant = group.records.encode(SectorState(30, FINAL_STATUS, [7, 8, 9]), True, None)
        running = group.records.encode(SectorState(3, STATUSES[3], [7, 8]), False, None)
        stride = max(1, sectors // live)
        live_ids = [i * stride for i in range(live)]
        live_set = set(live_ids)
        states_db = store.db("states")
        live_db = store.db("live")

        def fill(txn: Any) -> None:
            cur = txn.cursor(db=states_db)
            for ids in chunks(sectors, 100_000):
                items = [(group.records.key(i), running if i in live_set else dormant) for i in ids]
                _, added = cur.putmulti(items, append=True)
                if added != len(items):
                    raise RuntimeError(f"built only {added} of {len(items)} records")
            cur = txn.cursor(db=live_db)
            cur.putmulti([(group.records.key(i), b"") for i in live_ids], append=True)

        store.write(fill)
        store.sync()
    finally:
        store.close()
    return time.perf_counter() - t0


async def _child_restart(store_dir: Path, expect_live: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    store = LmdbStore(store_dir)
    workload = RestartWorkload()
    group = StateGroup(store, GROUP, workload.planner, SectorState, final=is_final)
    await group.start()
    await group.idle()
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "restart_s": elapsed,
        "replanned": workload.replanned,
        "loaded": group.stats()["loaded"],
        **memory_mb(),
    }
    await group.stop()
    await store.aclose()
    if workload.replanned != expect_live:
        raise RuntimeError(f"re-planned {workload.replanned} machines, expected {expect_live}")
    return result


def child_main(store_dir: Path, expect_live: int) -> None:
    print(json.dumps(asyncio.run(_child_restart(store_dir, expect_live))))


def run_child(store_dir: Path, expect_live: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-restart",
        str(store_dir),
        "--expect-live",
        str(expect_live),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"restart child failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall  # interpreter start, imports, restart, stop, exit
    return result


@dataclass
class RestartFigures:
    sectors: int
    live: int
    build_s: float
    cold: dict[str, Any]
    warm: list[dict[str, Any]]

    def warm_median(self, key: str) -> float:
        runs = self.warm or [self.cold]
        return median([float(r[key]) for r in runs])


def restart_phase(base: Path, sectors: int, live: int, warm_runs: int) -> RestartFigures:
    store_dir = base / f"restart-{sectors}"
    build_s = build_store(store_dir, sectors, live)
    size_mb = (store_dir / "data.mdb").stat().st_size / 2**20
    log(f"built {sectors:,} sectors ({live:,} live) in {build_s:.2f}s, {size_mb:.0f} MiB")
    drop_page_cache(store_dir)
    cold = run_child(store_dir, live)
    log(f"  cold restart {cold['restart_s']:.3f}s, rss {cold['rss_mb']:.1f} MiB")
    warm = []
    for _ in range(warm_runs):
        warm.append(run_child(store_dir, live))
    if warm:
        log(
            f"  warm restart median {median([r['restart_s'] for r in warm]):.3f}s, "
            f"rss {median([r['rss_mb'] for r in warm]):.1f} MiB "
            f"(anon {median([r['rss_anon_mb'] for r in warm]):.1f})"
        )
    return RestartFigures(sectors, live, build_s, cold, warm)


# -- driver -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    machines: int
    k: int
    reps: int
    sync_machines: int
    sync_k: int
    sync_reps: int
    restart_sectors: int
    small_sectors: int
    live: int
    warm_runs: int


FULL = Config(
    quick=False,
    machines=10_000,
    k=30,
    reps=5,
    sync_machines=200,
    sync_k=20,
    sync_reps=3,
    restart_sectors=1_000_000,
    small_sectors=100_000,
    live=1_000,
    warm_runs=3,
)
QUICK = Config(
    quick=True,
    machines=10_000,
    k=30,
    reps=5,
    sync_machines=100,
    sync_k=10,
    sync_reps=2,
    restart_sectors=1_000_000,
    small_sectors=100_000,
    live=1_000,
    warm_runs=1,
)


def throughput_phase(
    base: Path,
    durability: Durability,
    machines: int,
    k: int,
    reps: int,
    batch_of: Callable[[EngineRun], int],
) -> list[tuple[EngineRun, float]]:
    """`reps` rounds of (engine run, raw run with the batch size that run had), interleaved."""
    out = []
    for rep in range(reps):
        run = engine_run(base / f"engine-{durability}-{rep}", durability, machines, k)
        batch = batch_of(run)
        raw = raw_lmdb_run(base / f"raw-{durability}-{rep}", machines, run.transitions, batch)
        log(
            f"{durability} rep {rep + 1}/{reps}: engine {run.tps:,.0f} tps "
            f"({run.transitions:,} transitions in {run.elapsed_s:.2f}s, {run.batches} batches, "
            f"{run.transactions} txns; begin {run.begin_s:.2f}s), raw {raw:,.0f} tps "
            f"at {batch:,}/commit, ratio {run.tps / raw:.3f}"
        )
        out.append((run, raw))
    return out


def variant_phase(base: Path, cfg: Config) -> dict[str, Any]:
    """Where the time goes: plain-function steps, a Task per step, `gc.freeze()` after start-up.

    Each variant is one engine run paired with a raw run of its own batch size. Quick runs
    only the Task-per-step variant (the others are within noise of the main figure).
    """
    out: dict[str, Any] = {}
    variants = [
        ("plain_steps", True, False, True),
        ("task_per_step", False, False, False),
        ("async_gc_frozen", False, True, True),
    ]
    for name, plain, frozen, eager in variants[1:2] if cfg.quick else variants:
        run = engine_run(
            base / f"engine-{name}", "group", cfg.machines, cfg.k, plain, frozen, eager
        )
        raw = raw_lmdb_run(
            base / f"raw-{name}", cfg.machines, run.transitions, max(1, round(run.per_commit))
        )
        log(f"variant {name}: engine {run.tps:,.0f} tps, raw {raw:,.0f}, ratio {run.tps / raw:.3f}")
        out[f"ratio_{name}"] = round(run.tps / raw, 4)
        out[f"engine_tps_{name}"] = round(run.tps)
    return out


def bench(cfg: Config) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="sectorfsm-bench-"))
    try:
        log(f"{'quick' if cfg.quick else 'full'} run in {base}")
        group_runs = throughput_phase(
            base, "group", cfg.machines, cfg.k, cfg.reps, lambda r: max(1, round(r.per_commit))
        )
        sync_runs = throughput_phase(
            base, "sync", cfg.sync_machines, cfg.sync_k, cfg.sync_reps, lambda r: 1
        )
        variants = variant_phase(base, cfg)
        small = restart_phase(base, cfg.small_sectors, cfg.live, cfg.warm_runs)
        big = restart_phase(base, cfg.restart_sectors, cfg.live, cfg.warm_runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    engine_tps = median([r.tps for r, _ in group_runs])
    raw_tps = median([raw for _, raw in group_runs])
    sync_tps = median([r.tps for r, _ in sync_runs])
    raw_sync_tps = median([raw for _, raw in sync_runs])
    dormant_delta = (big.sectors - big.live) - (small.sectors - small.live)
    per_100k = 100_000 / dormant_delta

    def rss_slope(key: str) -> float:
        return round((big.warm_median(key) - small.warm_median(key)) * per_100k, 3)

    last = group_runs[-1][0]
    # Each round pairs an engine run with its baseline run right after it, so a slow spell of
    # the (shared, noisy) machine slows both and cancels in the round's ratio: the figure is
    # the median of those paired ratios. The ratio of the two medians is reported alongside.
    paired = [r.tps / raw for r, raw in group_runs]
    return {
        "ratio_vs_raw_lmdb": round(median(paired), 4),
        "engine_group_tps": round(engine_tps),
        "raw_lmdb_tps": round(raw_tps),
        "ratio_runs": [round(x, 4) for x in paired],
        "ratio_of_medians": round(engine_tps / raw_tps, 4),
        "transitions_per_commit": round(median([r.per_commit for r, _ in group_runs]), 1),
        "engine_group_machines": cfg.machines,
        "engine_group_k": cfg.k,
        "engine_group_transitions": last.transitions,
        "engine_begin_s": round(median([r.begin_s for r, _ in group_runs]), 3),
        **variants,
        "engine_sync_tps": round(sync_tps),
        "raw_lmdb_sync_tps": round(raw_sync_tps),
        "ratio_sync_vs_raw_lmdb": round(median([r.tps / raw for r, raw in sync_runs]), 4),
        "sync_commits_per_transition": round(
            median([r.transactions / r.transitions for r, _ in sync_runs]), 3
        ),
        "engine_sync_machines": cfg.sync_machines,
        "engine_sync_k": cfg.sync_k,
        "restart_s": round(big.warm_median("restart_s"), 4),
        "restart_cold_s": round(float(big.cold["restart_s"]), 4),
        "restart_sectors": big.sectors,
        "restart_live": big.live,
        "restart_process_s": round(big.warm_median("process_s"), 3),
        "restart_build_s": round(big.build_s, 2),
        "rss_mb_per_100k_dormant": rss_slope("rss_mb"),
        "rss_anon_mb_per_100k_dormant": rss_slope("rss_anon_mb"),
        "rss_small_mb": small.warm_median("rss_mb"),
        "rss_big_mb": big.warm_median("rss_mb"),
        "rss_small_sectors": small.sectors,
        "quick": cfg.quick,
        "python": platform.python_version(),
        "lmdb": lmdb.version(),
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the <= 60 s variant")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--child-restart", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--expect-live", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_restart is not None:
        child_main(args.child_restart, args.expect_live)
        return 0
    t0 = time.perf_counter()
    result = bench(QUICK if args.quick else FULL)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n", encoding="utf-8")
    log(f"done in {result['wall_s']}s")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
