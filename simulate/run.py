"""One simulated run: the real `Miner` (engine, scheduler, policy, DevnetChain) on a virtual clock.

The run opens a miner in a fresh temporary repo (durability `nosync`, the `sim` sealer with the
config's per-worker durations), feeds it sectors by the pledge plan, injects the faults, samples
what `collect.py` records, and stops after the simulated days; the repo is then deleted. Every
draw comes from a stream seeded by the run's seed, so one seed gives the same run twice.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..fsm import VirtualClock
from ..sched import TaskType, WorkerPolicy, WorkerSpec, load_policy
from ..sealing.backends.sim import DURATIONS_32G, SimBackend
from ..sealing.chain import ChainParams
from ..sealing.commp import zero_piece_cid
from ..sealing.config import SealingConfig
from ..sealing.errors import SealingError
from ..sealing.miner import Miner
from ..sealing.options import chain_params
from .bound import STAGES, Bound, bound
from .collect import Collector
from .config import SimulateConfig, WhatIf, added_worker, policy_for
from .faults import FaultInjector, FaultLog

__all__ = [
    "RunResult",
    "Variant",
    "run_all",
    "run_once",
    "seconds_table",
    "variants",
    "warmup_seconds",
]

_32G = 32 << 30
#: The virtual clock's start: fixed, so nothing in a run depends on when it ran.
START = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class Variant:
    """The cluster one run simulates: the baseline, or the baseline changed by a what-if."""

    label: str
    workers: tuple[WorkerSpec, ...]
    #: Workers whose policy the what-if replaced.
    policies: tuple[tuple[str, WorkerPolicy], ...] = ()
    #: Workers a what-if added, and the declared worker each copies (its durations too).
    copies: tuple[tuple[str, str], ...] = ()

    def policy_map(self) -> dict[str, WorkerPolicy]:
        """Each worker's policy in force at the start (its file's, a what-if's, or none)."""
        out = {
            w.name: load_policy(w.policy_file) if w.policy_file is not None else WorkerPolicy()
            for w in self.workers
        }
        out.update(dict(self.policies))
        return out


def variants(cfg: SimulateConfig, what_ifs: list[WhatIf]) -> list[Variant]:
    """The baseline, then one variant per what-if."""
    out = [Variant("baseline", tuple(cfg.workers))]
    for what in what_ifs:
        spec = cfg.worker(what.worker)
        if what.kind == "add-worker":
            extra = added_worker(spec, {w.name for w in cfg.workers})
            copies = ((extra.name, spec.name),)
            out.append(Variant(what.label, (*cfg.workers, extra), copies=copies))
        else:
            out.append(
                Variant(what.label, tuple(cfg.workers), ((spec.name, policy_for(what, spec)),))
            )
    return out


def seconds_table(cfg: SimulateConfig, variant: Variant) -> dict[str, dict[TaskType, float]]:
    """Seconds per task per worker at the config's sector size (defaults, then overrides)."""
    base = {t: DURATIONS_32G.get(t, 60.0) * cfg.sector_size / _32G for t in STAGES}
    base.update(cfg.durations)
    copies = dict(variant.copies)
    table = {}
    for w in variant.workers:
        # A what-if's added worker is a copy: it runs at the speed of the one it copies.
        source = copies.get(w.name, w.name)
        table[w.name] = {**base, **cfg.worker_durations.get(source, {})}
    return table


def chain_of(cfg: SimulateConfig) -> str | ChainParams:
    """What `Miner.open(chain=...)` gets."""
    if cfg.chain == "devnet" and cfg.block_time is not None:
        return ChainParams.devnet(cfg.block_time)
    return cfg.chain


def warmup_seconds(cfg: SimulateConfig, b: Bound) -> float:
    """The fill-up time excluded from steady state: one sector's latency, plus a bottleneck task.

    The latency is the slowest worker's time per stage (fetch included), the chain's delays
    (challenge delay, inclusions, confidences) and the batchers' waits when batching is on.
    """
    if cfg.warmup_hours is not None:
        return cfg.warmup_hours * 3600
    params = chain_params(chain_of(cfg), sector_size=cfg.sector_size, sealer="sim")
    sealing = SealingConfig.from_dict(dict(cfg.sealing))
    work = 0.0
    for task in STAGES:
        shares = b.stages[task].workers
        work += max((s.seconds + s.fetch_seconds for s in shares), default=0.0)
    epochs = params.pre_commit_challenge_delay + params.interactive_porep_confidence
    epochs += 2 * (params.inclusion_delay + params.message_confidence)
    chain = epochs * params.block_time
    window = params.ticket_window() * params.block_time
    if sealing.batch_pre_commits:
        chain += min(
            sealing.pre_commit_batch_wait, max(0.0, window - sealing.pre_commit_batch_slack)
        )
    if sealing.aggregate_commits:
        chain += sealing.commit_batch_wait
    longest = max(
        (s.seconds + s.fetch_seconds for t in b.limiting for s in b.stages[t].workers), default=0.0
    )
    return math.ceil((work + chain + longest) / 3600) * 3600.0


@dataclass(slots=True)
class RunResult:
    """One run's raw figures (`summary.py` turns them into the JSON)."""

    assigner: str
    variant: Variant
    days: float
    warmup: float
    bound: Bound
    seconds: dict[str, dict[TaskType, float]]
    collector: Collector
    faults: FaultLog
    fetched: dict[tuple[str, str], int] = field(default_factory=dict)
    pledged: int = 0
    refused: int = 0


async def run_once(
    cfg: SimulateConfig,
    variant: Variant,
    assigner: str,
    days: float,
    seed: int,
    progress: Callable[[float], None] | None = None,
) -> RunResult:
    """Run `variant` under `assigner` for `days` simulated days; `progress(seconds)` per sample."""
    seconds = seconds_table(cfg, variant)
    b = bound(variant.workers, cfg.sector_size, seconds, variant.policy_map(), assigner=assigner)
    warmup = warmup_seconds(cfg, b)
    sim_durations = {
        w: {t.short: s * _32G / cfg.sector_size for t, s in table.items()}
        for w, table in seconds.items()
    }
    sealing = {**cfg.sealing, "auto_pledge": cfg.pledge.mode == "auto"}
    with tempfile.TemporaryDirectory(prefix="sectors-simulate-") as tmp:
        workers = _with_policy_files(variant, Path(tmp))
        clock = VirtualClock(start=START)
        async with Miner.open(
            Path(tmp) / "repo",
            sealer="sim",
            clock=clock,
            sector_size=cfg.sector_size,
            chain=chain_of(cfg),
            config=sealing,
            workers=workers,
            durability="nosync",
            sealer_options={"durations": sim_durations},
            assigner=assigner,
        ) as miner:
            collector = Collector(
                miner, clock.now(), cfg.sample_hours * 3600, prepares_apart=b.prepares_apart
            )
            faults = FaultInjector(miner, cfg.faults, seed)
            result = RunResult(assigner, variant, days, warmup, b, seconds, collector, faults.log)
            collector.start()
            faults.start()
            feeder = asyncio.get_running_loop().create_task(_feed(miner, cfg, seed, result))
            try:
                await _tick(collector, days * 86400, progress)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
                await faults.stop()
                await collector.stop()
            backend = miner.sealer.backend
            if isinstance(backend, SimBackend):
                result.fetched = dict(backend.fetched)
    return result


async def _tick(collector: Collector, end: float, progress: Callable[[float], None] | None) -> None:
    clock = collector.miner.clock
    collector.take_sample()
    k = 0
    while True:
        k += 1
        t = min(k * collector.sample, end)
        await clock.sleep_until(collector.t0 + t)
        collector.take_sample()
        if progress is not None:
            progress(t)
        if t >= end:
            return


async def _feed(miner: Miner, cfg: SimulateConfig, seed: int, result: RunResult) -> None:
    """Bring sectors in by the pledge plan until cancelled."""
    plan, clock, t0 = cfg.pledge, miner.clock, result.collector.t0
    if plan.mode == "rate":
        interval = 86400 / plan.per_day
        n = 0
        while True:
            await _pledge_one(miner, result)
            n += 1
            await clock.sleep_until(t0 + n * interval)
    elif plan.mode == "fill":
        n = 0
        while True:
            try:
                made = await miner.pledge_fill()
                result.pledged += len(made.sectors)
            except SealingError:
                result.refused += 1
            n += 1
            await clock.sleep_until(t0 + n * plan.every_hours * 3600)
    elif plan.mode == "deals":
        rng = random.Random(f"{seed}/deals")
        piece = zero_piece_cid(cfg.sector_size)
        while True:
            await clock.sleep(rng.expovariate(plan.deals_per_day / 86400))
            try:
                await miner.add_piece(piece, cfg.sector_size)
                result.pledged += 1
            except (SealingError, ValueError):
                result.refused += 1


async def _pledge_one(miner: Miner, result: RunResult) -> None:
    try:
        await miner.pledge()
        result.pledged += 1
    except SealingError:  # MaxSealingSectors: the pledge is refused, as `sectors pledge` would be
        result.refused += 1


def _with_policy_files(variant: Variant, tmp: Path) -> list[WorkerSpec]:
    """Fresh copies of the variant's workers, a what-if's policy read from a file in `tmp`.

    Copies, because the scheduler's storage index counts bytes on the very `StoragePath`
    objects it is given: a second run on the same specs would start with the first's disks.
    """
    replaced = dict(variant.policies)
    out = []
    for w in variant.workers:
        w = replace(w, resources=replace(w.resources), paths=tuple(replace(p) for p in w.paths))
        if w.name in replaced:
            path = tmp / f"policy-{w.name}.json"
            path.write_text(json.dumps(replaced[w.name].as_myscheduler(), indent=1))
            w = replace(w, policy_file=path)
        out.append(w)
    return out


def run_all(
    cfg: SimulateConfig,
    what_ifs: list[WhatIf],
    days: float,
    seed: int,
    progress: Callable[[str, float], None] | None = None,
) -> list[RunResult]:
    """Every variant under every assigner, in order, each on the same seed.

    Each run gets an event loop of its own: whatever the previous engine left behind when it
    closed (a step still waiting on its clock) is cancelled with that loop and cannot steal
    time from the next run.
    """
    results = []
    for variant in variants(cfg, what_ifs):
        for assigner in cfg.assigners:
            label = f"{variant.label} / {assigner}"

            def tick(t: float, label: str = label) -> None:
                if progress is not None:
                    progress(label, t)

            results.append(asyncio.run(run_once(cfg, variant, assigner, days, seed, tick)))
    return results
