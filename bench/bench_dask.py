#!/usr/bin/env python
"""Benchmark of remote workers on Dask: scheduler dispatch against raw pinned Dask round trips.

Run ``python bench/bench_dask.py [--quick] [--profile]``. Progress goes to stderr; the last
line of stdout is one JSON object with every figure (see the "Dask workers benchmark" section
of bench/README.md).

The engine's embedded Dask scheduler runs in this process (`open_cluster`, as `sectors run`
with `[cluster] listen` does) and four real `sectors worker` processes join it on 127.0.0.1.
Each round measures, back to back on the same workers:

* ``raw``: `client.submit(abs, -1)` pinned to a worker's address (`workers=[addr],
  allow_other_workers=False, pure=False`), awaited; the floor Dask itself sets.
* ``registry``: the same trivial job through the worker's job registry (`jobs.submit` + ack),
  which runs it in a killable child process: the cost of the job registry alone.
* ``sched``: `sched.schedule(...)` of an AP task whose work is `job.run(abs, -1)` on the
  per-worker dask backend: what a sealing task pays from queue to result.

Fairness: the three ways run the same function (`abs(-1)`) from the same client onto the
same four workers, round robin, at the same concurrency: latency one job at a time,
throughput with `--inflight` jobs (default 8, two per worker) in flight on both sides. The
raw baseline does only what Dask does: no record, no child process, no acknowledgement. The
registry and sched ways pay for the guarantees: a record written before the child starts (a
job id runs once across worker and engine crashes), the result written and kept until the
engine acknowledges it, the work in a child process that can be killed. Their
acknowledgements ride with the next job to the same worker (`acks.py`, as the backend
sends them), so the figures include them. Everything (scheduler, client, four workers, their
spawners and job children) shares this machine's cores, so throughput is bound by the CPU a
job costs in all processes together: `cpu_ms_per_job` shows where it goes.

A ratio is taken per round (paired, so a slow spell of the shared machine cancels) and the
median over rounds is reported. Last, a worker running a job is killed with SIGKILL and the
time until the job fails, its worker is removed and the retry is placed on another worker is
measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import json
import logging
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from distributed import Client

from sectorfsm.fsm.gctune import engine_gc
from sectorfsm.sched import Scheduler
from sectorfsm.sched.scheduler import Job
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.acks import AckBatch
from sectorfsm.sealing.backends.dask.backend import DaskWorkerBackend, Releases, function_path
from sectorfsm.sealing.backends.dask.jobrecord import encode_spec
from sectorfsm.sealing.backends.dask.membership import Cluster, open_cluster

START = time.perf_counter()
WORKERS = 4
S2K = 2048
#: Seconds any single wait of the benchmark may take before it gives up (a hang guard).
GUARD = 120.0
#: The module the worker's job registry runs each job in.
CHILD = "sectorfsm.sealing.backends.dask.child"

WORKER_TOML = """
cpus = 64
memory = "256GiB"
tasks = ["AP", "PC1"]
threads = 64
state_dir = "jobs"

[[paths]]
id = "{name}-seal"
path = "seal"
capacity = "1GiB"
"""


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def until(check: Callable[[], Any], what: str) -> Any:
    """Poll `check()` until truthy (GUARD seconds at most)."""
    deadline = time.monotonic() + GUARD
    while not (found := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen in {GUARD:g} s")
        await asyncio.sleep(0.005)
    return found


class Workers:
    """Four `sectors worker` processes, each in its own process group, killed on close."""

    def __init__(self, root: Path, address: str) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for n in range(WORKERS):
            name = f"b{n}"
            home = root / name
            home.mkdir()
            (home / "worker.toml").write_text(WORKER_TOML.format(name=name))
            self.procs[name] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "sectorfsm", "worker", "--scheduler", address),
                    *("--name", name, "--config", "worker.toml", "--host", "127.0.0.1"),
                ],
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=open(home / "log", "wb"),  # noqa: SIM115 (closed with the process)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the worker processes, and of their spawners with children."""
        workers = [p.pid for p in self.procs.values()]
        spawners = [pid for w in workers for pid in _children(w)]
        # The warm children live across jobs: count them running, and once reaped.
        warm = [pid for s in spawners for pid in _children(s)]
        return {
            "workers": sum(_cpu_s(pid) for pid in workers),
            # The event loop's thread alone (its tid is the pid): the rest are Dask's task
            # threads and ours (the children's reader, the sweeper).
            "workers_loop": sum(_cpu_s(pid, thread=pid) for pid in workers),
            "children": sum(_cpu_s(pid, reaped=True) for pid in spawners + warm),
        }

    def kill9(self, name: str) -> None:
        """SIGKILL the worker process itself (its job's child dies with it: PDEATHSIG)."""
        os.kill(self.procs[name].pid, signal.SIGKILL)

    def close(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def _cpu_s(pid: int, reaped: bool = False, thread: int | None = None) -> float:
    """CPU seconds of process `pid` (with `reaped`: plus those of its reaped children).

    With `thread`, of that thread of the process only.
    """
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11 : 15 if reaped else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The child processes of `pid`, started from any of its threads."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


class Bench:
    """The three ways to run a trivial job, on the same cluster."""

    def __init__(self, sched: Scheduler, cluster: Cluster) -> None:
        self.sched = sched
        self.client: Client = cluster.client
        self.backends: list[DaskWorkerBackend] = sorted(
            cluster.membership.members.values(), key=lambda b: b.name
        )
        self.addresses = [b.address for b in self.backends]
        self.acks = [AckBatch(self.client, address) for address in self.addresses]
        self.sector_numbers = itertools.count(1)
        self.job_ids = itertools.count(1)
        self.abs_path = function_path(abs)

    async def raw(self, i: int) -> None:
        """One pinned `client.submit` round trip."""
        address = self.addresses[i % len(self.addresses)]
        fut = self.client.submit(abs, -1, workers=[address], allow_other_workers=False, pure=False)
        assert await fut == 1
        fut.release()

    async def registry(self, i: int) -> None:
        """One job through the worker's job registry (child process), then its ack.

        Acks are queued per worker and ride with that worker's next job, as the backend does.
        """
        n = i % len(self.addresses)
        address, acks = self.addresses[n], self.acks[n]
        job_id = f"bench-{next(self.job_ids)}-{os.getpid()}"
        fut = jobs.submit(self.client, address, job_id, self.abs_path, [-1], acks.take())
        assert await fut == 1
        fut.release()
        acks.add(job_id)

    async def settle(self) -> None:
        """Send what a way's last jobs left queued (acks, releases), between timed windows.

        In a steady stream of jobs these ride with the next jobs to the same workers; cut
        into windows of 16 jobs, each way's last acks went out on their own 0.2 s later, in
        the next way's window (four `client.run` calls, ~0.3 ms of worker CPU per job).
        """
        pending = [a.flush() for a in self.acks] + [b.acks.flush() for b in self.backends]
        await asyncio.gather(*pending)
        Releases.of(self.client).flush()

    async def sched_job(self, i: int) -> None:
        """One AP task through `sched.schedule` onto the per-worker dask backend."""
        sector = SectorRef(1000, next(self.sector_numbers), S2K)

        async def work(job: Job) -> Any:
            return await job.run(abs, -1)

        got = await self.sched.schedule(sector, TaskType.ADD_PIECE, TaskSelector(), None, work)
        assert got == 1


async def latencies(run: Callable[[int], Awaitable[None]], n: int) -> list[float]:
    """Seconds of each of `n` jobs run one after the other."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await run(i)
        out.append(time.perf_counter() - t0)
    return out


async def throughput(run: Callable[[int], Awaitable[None]], n: int, inflight: int) -> float:
    """Jobs per second of `n` jobs with `inflight` of them in flight at any time."""
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < n:
            await run(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    return n / (time.perf_counter() - t0)


async def kill_nine(bench: Bench, workers: Workers) -> dict[str, float]:
    """Kill -9 the worker running a job: ms until it fails, the worker goes, the retry runs."""
    sched = bench.sched
    sector = SectorRef(1000, next(bench.sector_numbers), S2K)
    placed: list[tuple[str, float]] = []

    async def work(job: Job) -> Any:
        placed.append((job.worker.name, time.perf_counter()))
        return await job.run(time.sleep, 600)

    async def quick(job: Job) -> Any:
        placed.append((job.worker.name, time.perf_counter()))
        return await job.run(abs, -1)

    first = asyncio.ensure_future(
        sched.schedule(sector, TaskType.ADD_PIECE, TaskSelector(), None, work)
    )
    await until(lambda: placed, "the job placed")
    victim = placed[0][0]
    backend = next(b for b in bench.backends if b.name == victim)
    # The job is running once the worker's heartbeat lists it (its child has started).
    await until(lambda: backend.jobs, "the job running on the worker")
    t0 = time.perf_counter()
    workers.kill9(victim)
    try:
        await first
    except Exception:  # KilledWorker or RemoteWorkerLost: the job failed, as it must
        pass
    else:
        raise AssertionError("the killed worker's job succeeded")
    failed = time.perf_counter() - t0
    removed_task = asyncio.ensure_future(until(lambda: sched.find_worker(victim) is None, "gone"))
    # What the sector's FSM does next: schedule the task again; it is placed elsewhere.
    await sched.schedule(sector, TaskType.ADD_PIECE, TaskSelector(), None, quick)
    name, placed_at = placed[-1]
    assert name != victim, "the retry went to the killed worker"
    await removed_task
    removed = time.perf_counter() - t0
    return {
        "kill_to_failed_ms": round(1000 * failed, 1),
        "kill_to_requeued_ms": round(1000 * (placed_at - t0), 1),
        "kill_to_removed_ms": round(1000 * removed, 1),
    }


def child_start(root: Path, runs: int = 5) -> dict[str, float]:
    """Median ms of the registry's job child on a trivial spec, and of a bare interpreter.

    Where the registry's per-job cost goes: the child is a fresh interpreter that imports
    its module (and the packages above it) before it calls the job's function.
    """
    prefix = root / "child-probe"  # the job's files are `child-probe.NAME`
    spec = encode_spec("builtins:abs", [-1])
    (root / "child-probe.spec").write_bytes(spec)
    prefix.mkdir()  # and `child-probe/NAME` for a tree before the flat layout (bench "before")
    (prefix / "spec").write_bytes(spec)

    def timed(argv: list[str]) -> float:
        xs = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
            xs.append(time.perf_counter() - t0)
        return round(1000 * median(xs), 1)

    return {
        "child_process_ms": timed([sys.executable, "-m", CHILD, str(prefix)]),
        "bare_python_ms": timed([sys.executable, "-c", "import msgpack"]),
    }


async def main_async(a: argparse.Namespace, root: Path) -> dict[str, Any]:
    # The collector as `sectors run` sets it for its engine (`Miner.open`): with CPython's
    # defaults a full collection of this process (~45 ms) fell inside one way's 16 jobs.
    with engine_gc():
        return await measure(a, root)


async def measure(a: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start the cluster and its workers, run every round, then the kill -9."""
    sched = Scheduler(policy_poll_interval=0.1)
    await sched.start()
    workers: Workers | None = None
    try:
        async with open_cluster(
            sched, listen="tcp://127.0.0.1:0", say=lambda line: log(f"cluster: {line}"), beat=0.1
        ) as cluster:
            log(f"embedded Dask scheduler at {cluster.address}; starting {WORKERS} workers")
            workers = Workers(root, cluster.address)
            for name in workers.procs:
                await until(lambda n=name: sched.find_worker(n), f"{name} registered")
            bench = Bench(sched, cluster)
            ways: dict[str, Callable[[int], Awaitable[None]]] = {
                "raw": bench.raw,
                "registry": bench.registry,
                "sched": bench.sched_job,
            }
            for run in ways.values():  # warm up: imports, connections, the child's page cache
                await throughput(run, 2 * WORKERS, WORKERS)
                await bench.settle()
            lat: dict[str, list[float]] = {k: [] for k in ways}
            tps: dict[str, list[float]] = {k: [] for k in ways}
            parts = ("engine", "workers", "workers_loop", "children")
            cpu: dict[str, dict[str, list[float]]] = {k: {p: [] for p in parts} for k in ways}
            ratios: list[float] = []
            ratios_registry: list[float] = []
            ratios_sched_registry: list[float] = []
            added: list[float] = []
            added_registry: list[float] = []
            profiler = cProfile.Profile() if a.profile else None
            # Client->scheduler messages per job, one job at a time: Dask sends at most one
            # per 10 ms, so a job that needs two waits for the interval.
            messages: dict[str, list[float]] = {k: [] for k in ways}
            comm = bench.client.scheduler_comm
            for r in range(a.rounds):
                p50 = {}
                for key, run in ways.items():
                    sent = comm.batch_count
                    xs = await latencies(run, a.latency_jobs)
                    messages[key].append((comm.batch_count - sent) / a.latency_jobs)
                    await bench.settle()
                    lat[key] += xs
                    p50[key] = median(xs)
                for key, run in ways.items():
                    if profiler is not None and key == "sched":
                        profiler.enable()
                    before = {"engine": time.process_time(), **workers.cpu()}
                    tps[key].append(await throughput(run, a.jobs, a.inflight))
                    after = {"engine": time.process_time(), **workers.cpu()}
                    for part, t in after.items():
                        cpu[key][part].append(1000 * (t - before[part]) / a.jobs)
                    await bench.settle()
                    if profiler is not None and key == "sched":
                        profiler.disable()
                ratios.append(tps["sched"][-1] / tps["raw"][-1])
                ratios_registry.append(tps["registry"][-1] / tps["raw"][-1])
                ratios_sched_registry.append(tps["sched"][-1] / tps["registry"][-1])
                added.append(p50["sched"] - p50["raw"])
                added_registry.append(p50["sched"] - p50["registry"])
                log(
                    f"round {r + 1}/{a.rounds}: tps raw {tps['raw'][-1]:.1f} registry "
                    f"{tps['registry'][-1]:.1f} sched {tps['sched'][-1]:.1f} "
                    f"(ratio {ratios[-1]:.3f}); p50 ms raw {1000 * p50['raw']:.1f} registry "
                    f"{1000 * p50['registry']:.1f} sched {1000 * p50['sched']:.1f}"
                )
            if profiler is not None:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
                print(text.getvalue(), file=sys.stderr)
            log("kill -9 of a worker running a job")
            fault = await kill_nine(bench, workers)
            log(f"kill -9: {fault}")
    finally:
        if workers is not None:
            workers.close()
        await sched.stop()

    def ms(xs: Sequence[float], q: float) -> float:
        return round(1000 * pct(xs, q), 2)

    return {
        "workers": WORKERS,
        "rounds": a.rounds,
        "jobs_per_round": a.jobs,
        "inflight": a.inflight,
        "latency_jobs_per_round": a.latency_jobs,
        "raw_dask_tps": round(median(tps["raw"]), 1),
        "registry_tps": round(median(tps["registry"]), 1),
        "sched_tps": round(median(tps["sched"]), 1),
        "ratio_vs_raw_dask": round(median(ratios), 3),
        "ratio_runs": [round(x, 3) for x in ratios],
        "ratio_of_medians": round(median(tps["sched"]) / median(tps["raw"]), 3),
        "registry_ratio_vs_raw_dask": round(median(ratios_registry), 3),
        "sched_ratio_vs_registry": round(median(ratios_sched_registry), 3),
        "raw_p50_ms": ms(lat["raw"], 0.5),
        "raw_p90_ms": ms(lat["raw"], 0.9),
        "registry_p50_ms": ms(lat["registry"], 0.5),
        "sched_p50_ms": ms(lat["sched"], 0.5),
        "sched_p90_ms": ms(lat["sched"], 0.9),
        "added_p50_ms": round(1000 * median(added), 2),
        "cpu_ms_per_job": {
            k: {p: round(median(xs), 2) for p, xs in by.items()} for k, by in cpu.items()
        },
        "sched_added_vs_registry_p50_ms": round(1000 * median(added_registry), 2),
        "client_messages_per_job": {k: round(median(xs), 2) for k, xs in messages.items()},
        **fault,
        **child_start(root),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run, under 60 s")
    p.add_argument("--profile", action="store_true", help="cProfile the sched throughput runs")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--inflight", type=int, default=8, help="jobs in flight for throughput")
    p.add_argument("--rounds", type=int, help="rounds (default 3 with --quick, else 5)")
    p.add_argument(
        "--jobs",
        type=int,
        help="throughput jobs per way and round (default 16 / 80): more "
        "for finer CPU figures (they move in clock ticks of 10 ms)",
    )
    a = p.parse_args()
    a.rounds = a.rounds or (3 if a.quick else 5)
    a.jobs = a.jobs or (16 if a.quick else 80)
    a.latency_jobs = 8 if a.quick else 30
    logging.getLogger("distributed").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    try:
        result: dict[str, Any] = {"bench": "dask", "quick": a.quick}
        result.update(asyncio.run(main_async(a, root)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["python"] = platform.python_version()
    result["cpus"] = os.cpu_count()
    result["wall_s"] = round(time.perf_counter() - START, 1)
    line = json.dumps(result)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
