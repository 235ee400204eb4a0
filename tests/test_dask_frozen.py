"""A remote worker frozen with SIGSTOP (issue 15, item 4): disabled, passed over, then back.

The heartbeat grace comes from `[cluster]` (`heartbeat_grace`, shorter than Dask's
`worker_ttl`, which must not drop the worker meanwhile). A task assigned to a worker whose
last heartbeat is stale waits in the scheduler, never handed over; when the grace disables
the worker it goes back to the queue and runs on the other one. A job that was running on the
frozen worker stays there and finishes once, when the worker resumes. The real-process test
SIGSTOPs the process group of a `sectors worker` (the Dask worker; its job children live in
groups of their own, as on a host whose engine link froze), and SIGCONTs it in a `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jobfuncs
import pytest
from conftest import HANG_GUARD, Spawner, child_env, eventually, run, settle
from test_sched_workers import RecordingBackend
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.cli.runconfig import RunConfigError, load_run_config
from sectorfsm.fsm import VirtualClock
from sectorfsm.fsm.codec import packb
from sectorfsm.fsm.store import LmdbStore
from sectorfsm.sched import Scheduler
from sectorfsm.sched.ledger import Phase, WorkerResources
from sectorfsm.sched.liveness import STALL, start_window
from sectorfsm.sched.scheduler import Job
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.views import SNAPSHOT_KEY
from sectorfsm.sched.workers import Worker, WorkerSpec
from sectorfsm.sealing.backends.dask.membership import Cluster, open_cluster
from sectorfsm.sealing.store_view import store_path

TESTS = Path(__file__).resolve().parent
GIB = 1 << 30
PC1 = TaskType.PRE_COMMIT1

# ------------------------------------------------------------------ config and the gate


def _cluster(tmp: Path, table: str) -> Any:
    path = tmp / "sectors.toml"
    path.write_text(f'[cluster]\nlisten = "tcp://127.0.0.1:0"\n{table}\n')
    return load_run_config(path).cluster


def test_heartbeat_grace_comes_from_the_cluster_table(tmp_path: Path) -> None:
    assert _cluster(tmp_path, "").heartbeat_grace == 30.0
    assert _cluster(tmp_path, "worker_ttl = 20").heartbeat_grace == 10.0
    assert _cluster(tmp_path, "worker_ttl = 9\nheartbeat_grace = 2").heartbeat_grace == 2.0
    for table, message in [
        ("worker_ttl = 9\nheartbeat_grace = 9", "heartbeat_grace: 9 s must be shorter than"),
        ("heartbeat_grace = 0", "heartbeat_grace"),
    ]:
        with pytest.raises(RunConfigError) as info:
            _cluster(tmp_path, table)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def _phases(w: Worker) -> dict[Phase, int]:
    """The phases of the tasks `w`'s ledger holds (none: {})."""
    return {p: n for p, n in w.ledger.phase_counts().items() if n}


def _remote(name: str) -> WorkerSpec:
    return WorkerSpec(name, WorkerResources(cpus=64, mem_physical=512 * GIB), remote=True)


def test_work_waits_for_a_fresh_heartbeat_and_goes_elsewhere_when_the_worker_is_disabled() -> None:
    clock = VirtualClock(start=0.0, auto_advance=False)

    async def main() -> None:
        sched = Scheduler(clock=clock)
        sched.remote_grace = 4.0
        a = sched.add_worker(_remote("a"))
        assert a.spec.heartbeat_grace == 4.0 and start_window(a) == 2.0
        ran: list[tuple[int, str]] = []

        async def work(job: Job) -> str:
            ran.append((job.sector.number, job.worker.name))
            return job.worker.name

        def schedule(n: int) -> asyncio.Task[str]:
            sector = SectorRef(1000, n, 2048)
            return asyncio.create_task(sched.schedule(sector, PC1, TaskSelector(), None, work))

        # Fresh: work starts at once (no virtual time passes, whatever the machine's load).
        first = schedule(1)
        await settle()
        assert first.done() and first.result() == "a"
        # Silent for longer than its start window: assigned, but not handed over.
        clock.advance(3)
        held = schedule(2)
        await settle()
        assert not held.done() and ran == [(1, "a")]
        assert _phases(a) == {Phase.ASSIGNED: 1}
        # Cancelled while it waits, a task gives its worker back what it held.
        dropped = schedule(9)
        await settle()
        assert _phases(a) == {Phase.ASSIGNED: 2}
        dropped.cancel()
        await asyncio.gather(dropped, return_exceptions=True)
        assert _phases(a) == {Phase.ASSIGNED: 1}
        # A heartbeat lets it start there.
        sched.heartbeat("a")
        await settle()
        assert held.done() and held.result() == "a"
        # Silent again, with another worker around: past the grace the task goes there.
        clock.advance(3)
        moved = schedule(3)
        await settle()
        assert not moved.done()
        sched.add_worker(_remote("b"))
        sched.heartbeat("b")
        clock.advance(2)
        sched.check_workers()
        assert not a.enabled and a.disabled_reason == "no heartbeat for 5 s"
        await settle()
        assert moved.done() and moved.result() == "b"
        assert ran[-1] == (3, "b") and not a.ledger.entries
        # Its next heartbeat enables it again.
        sched.heartbeat("a")
        assert a.enabled and a.disabled_reason == ""

    run(main)


def test_an_engine_that_stalled_gives_its_workers_a_fresh_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Heartbeats wait unread while the engine's loop is blocked: that silence is not theirs."""
    clock = VirtualClock(start=0.0, auto_advance=False)

    async def main() -> None:
        sched = Scheduler(clock=clock, policy_poll_interval=0.01)
        sched.remote_grace = 4.0
        a = sched.add_worker(_remote("a"), RecordingBackend())  # heartbeats: `heartbeat` only
        sched.heartbeat("a")
        rounds: list[float] = []
        check = sched.check_workers

        def counted() -> None:
            rounds.append(clock.now())
            check()

        sched.check_workers = counted  # type: ignore[method-assign]
        await sched.start()
        try:
            await eventually(lambda: rounds, "the monitor's first round")
            seen = len(rounds)
            clock.advance(10)
            time.sleep(STALL + 0.2)  # noqa: ASYNC251 (the stall itself: the loop blocked)
            await eventually(lambda: len(rounds) > seen, "the monitor's round after the stall")
            assert a.enabled  # 10 s silent, but not while the engine listened
            said = [r.getMessage() for r in caplog.records]
            assert any(m.startswith("engine stalled ") for m in said), said
        finally:
            await sched.stop()
        clock.advance(3)
        sched.check_workers()
        assert a.enabled
        clock.advance(2)  # past the grace since the engine came back
        sched.check_workers()
        assert not a.enabled and a.disabled_reason == "no heartbeat for 15 s"

    run(main)


# ------------------------------------------------------------------ real sectors workers

WORKER = """
name = "{name}"
cpus = 4
memory = "8GiB"
tasks = ["PC1"]
threads = 8
state_dir = "jobs"
host = "127.0.0.1"
policy = "myscheduler.json"

[[paths]]
id = "{name}-seal"
path = "seal"
capacity = "1GiB"
"""

#: Two PC1 at a time per worker: the ledger's caps decide where each task can go.
POLICY = {"PreCommit1Max": 2, "ForceP1FromLocalAP": False}


def _box(tmp: Path, name: str) -> Path:
    box = tmp / name
    box.mkdir()
    (box / "worker.toml").write_text(WORKER.format(name=name))
    (box / "myscheduler.json").write_text(json.dumps(POLICY))
    return box


def published(tmp: Path, snapshot: dict[str, Any]) -> Path:
    """A repo whose store holds `snapshot` as the scheduler's latest (what `sectors run` does)."""
    repo = tmp / "repo"
    store = LmdbStore(store_path(repo))
    try:
        store.write(lambda txn: txn.put(SNAPSHOT_KEY, packb(snapshot), db=store.db("meta")))
    finally:
        store.close()
    return repo


def _cli(repo: Path, *args: str) -> Any:
    shown = CliRunner().invoke(app, [*args, "--json", "--repo", str(repo)])
    assert shown.exit_code == 0, shown.output
    return json.loads(shown.output)


def test_a_frozen_worker_is_disabled_its_unstarted_task_runs_elsewhere_and_it_comes_back(
    spawn: Spawner, tmp_path: Path
) -> None:
    cfg = _cluster(tmp_path, "worker_ttl = 60\nheartbeat_grace = 3")
    count, release = tmp_path / "count", tmp_path / "release"
    boxes = {n: _box(tmp_path, n) for n in ("wa", "wb")}
    ran: list[tuple[int, str]] = []
    frozen: list[int] = []

    async def gated(job: Job) -> Any:
        ran.append((job.sector.number, job.worker.name))
        return await job.run(jobfuncs.gate, str(count), str(release), job.worker.name)

    def lines() -> int:
        return len(count.read_text().splitlines()) if count.exists() else 0

    async def main() -> None:
        sched = Scheduler(policy_poll_interval=0.1)
        sched.remote_grace = cfg.heartbeat_grace
        await sched.start()
        try:
            async with open_cluster(
                sched, listen=cfg.listen, worker_ttl=cfg.worker_ttl, say=print, beat=0.1
            ) as cluster:
                await body(sched, cluster)
        finally:
            for pid in frozen:  # never leave a stopped group behind
                with_signal(pid, signal.SIGCONT)
            await sched.stop()

    def schedule(sched: Scheduler, n: int) -> asyncio.Future[Any]:
        sector = SectorRef(1000, n, 2048)
        return asyncio.ensure_future(sched.schedule(sector, PC1, TaskSelector(), None, gated))

    async def body(sched: Scheduler, cluster: Cluster) -> None:
        children = {
            n: spawn.python(
                *("-m", "sectorfsm", "worker", "--scheduler", cluster.address),
                *("--config", "worker.toml"),
                name=n,
                env=child_env(),
                cwd=box,
            )
            for n, box in boxes.items()
        }
        for n in children:
            w = await eventually(lambda n=n: sched.find_worker(n), f"{n} joined")
            await eventually(lambda w=w: w.policy.pre_commit1_max == 2, f"{n}'s policy")
            assert w.spec.remote and w.spec.heartbeat_grace == 3.0
        # One job runs (held by its gate) on whichever worker takes it: that one freezes.
        first = schedule(sched, 1)
        await eventually(lambda: lines() == 1, "the first job's child started")
        victim = ran[0][1]
        other = "wb" if victim == "wa" else "wa"
        v = sched.worker(victim)
        window = start_window(v)
        assert window == 1.5
        frozen.append(children[victim].pid)
        with_signal(children[victim].pid, signal.SIGSTOP)
        # Once its heartbeat is older than the start window, new work waits for it.
        await eventually(lambda: sched.clock.now() - v.last_heartbeat > window, "a stale heartbeat")
        assert v.enabled
        seen: list[Counter[str]] = []
        sched.add_cycle_listener(lambda: seen.append(Counter(v.ledger.phase_counts())))
        # Three more: the other worker has room for two, the frozen one for one.
        rest = [schedule(sched, n) for n in (2, 3, 4)]
        await eventually(lambda: lines() == 3, "two jobs started on the other worker")
        assert sorted(w for _, w in ran[1:]) == [other, other]
        # The frozen worker holds the third, assigned but not handed over.
        assert any(c[Phase.ASSIGNED] == 1 and c[Phase.RUNNING] == 1 for c in seen), seen
        (late,) = {2, 3, 4} - {n for n, _ in ran}
        # The grace disables it; its unstarted task is queued again (the other one is full).
        await eventually(lambda: not v.enabled, "the frozen worker disabled")
        assert v.disabled_reason.startswith("no heartbeat for "), v.disabled_reason
        # Disabling wakes the task that waits for the worker; it lets go on its next turn.
        await eventually(lambda: _phases(v) == {Phase.RUNNING: 1}, "its unstarted task let go")
        await eventually(lambda: sched.diag(), "the task back in the queue")
        repo = published(tmp_path, sched.snapshot())
        shown = {w["name"]: w for w in _cli(repo, "workers")["workers"]}
        assert not shown[victim]["enabled"]
        assert shown[victim]["disabled_reason"].startswith("no heartbeat for ")
        assert shown[other]["enabled"]
        (diag,) = _cli(repo, "sched-diag")["diag"]
        assert diag["sector"] == f"s-t01000-{late}"
        assert diag["reasons"][victim].startswith("no heartbeat for "), diag
        # Released, the other worker's jobs end and the queued task runs there, once.
        release.write_text("go")
        done = await asyncio.wait_for(asyncio.gather(*rest), HANG_GUARD)
        assert done == [other, other, other]
        assert (late, other) in ran and (late, victim) not in ran
        assert not first.done()  # its result waits in the frozen worker
        # SIGCONT: the worker's heartbeats resume, it is enabled again, and the job that was
        # running there returns its result, run once.
        with_signal(children[victim].pid, signal.SIGCONT)
        frozen.clear()
        assert await asyncio.wait_for(first, HANG_GUARD) == victim
        await eventually(lambda: v.enabled, "the worker enabled again")
        assert v.disabled_reason == ""
        assert lines() == 4
        # And it takes work: four at once fill both workers' two slots.
        again = [schedule(sched, n) for n in (5, 6, 7, 8)]
        assert sorted(await asyncio.wait_for(asyncio.gather(*again), HANG_GUARD)) == sorted(
            [victim, victim, other, other]
        )
        assert lines() == 8
        assert Counter(n for n, _ in ran) == Counter(range(1, 9))  # each task ran once
        assert sched.find_worker(victim) is v  # Dask never dropped it

    run(main)


def with_signal(pgid: int, sig: int) -> None:
    """Send `sig` to the process group `pgid` (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
