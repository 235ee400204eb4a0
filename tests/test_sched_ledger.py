"""The per-worker ledger never overcommits memory, CPU, GPU or per-type caps."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from conftest import HANG_GUARD
from hypothesis import given, settings
from hypothesis import strategies as st

from sectorfsm.sched.ledger import Ledger, WorkerResources
from sectorfsm.sched.resources import Resources, parse_overrides, resource_spec
from sectorfsm.sched.scheduler import Scheduler
from sectorfsm.sched.selectors import TaskSelector
from sectorfsm.sched.storage import SectorRef
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import WorkerSpec

GIB = 1 << 30
TYPES = [
    TaskType.ADD_PIECE,
    TaskType.PRE_COMMIT1,
    TaskType.PRE_COMMIT2,
    TaskType.COMMIT1,
    TaskType.COMMIT2,
    TaskType.FINALIZE,
]
SIZES = [2 << 10, 512 << 20, 32 << 30, 64 << 30]

workers_st = st.builds(
    WorkerResources,
    cpus=st.integers(1, 128),
    mem_physical=st.integers(1, 1024).map(lambda g: g * GIB),
    mem_swap=st.integers(0, 256).map(lambda g: g * GIB),
    gpus=st.lists(st.just("gpu"), max_size=4).map(tuple),
    mem_used=st.integers(0, 64).map(lambda g: g * GIB),
)


def check_invariants(led: Ledger) -> None:
    res = led.resources
    # Recompute from the entries: the running totals must match exactly.
    per_type = Counter(e.task_type for e in led.entries.values())
    assert per_type == +led.counts
    bases = sum(led.bases.values())
    assert led.mem_min_used == sum(e.need.min_memory for e in led.entries.values()) + bases
    assert led.mem_max_used == sum(e.need.max_memory for e in led.entries.values()) + bases
    # Compute is held by running entries; claims (still fetching) hold memory only.
    running = [e for e in led.entries.values() if e.computing]
    claims = [e for e in led.entries.values() if not e.computing]
    assert led.cpu_used == sum(e.threads for e in running)
    assert led.claimed_cpu == sum(e.threads for e in claims)
    assert led.claimed_threads == +Counter(
        {t: sum(e.threads for e in claims if e.task_type == t) for t in TYPES}
    )
    if res.gpus:
        for t in TYPES:
            mine = sum(e.need.gpu_utilization for e in claims if e.task_type == t)
            assert abs(led.claimed_gpus.get(t, 0.0) - mine) < 1e-9
    assert led.claimed_cpu <= res.cpus
    if res.gpus:
        assert led.claimed_gpu <= len(res.gpus) + 1e-9
    # And never beyond the worker.
    assert led.mem_min_used <= res.mem_physical
    assert led.mem_max_used <= res.mem_physical + res.mem_swap
    assert led.cpu_used <= res.cpus
    if res.gpus:
        assert led.gpu_used <= len(res.gpus) + 1e-9
    for t in led.counts:
        cap = led.entries[next(k for k, e in led.entries.items() if e.task_type == t)]
        if cap.need.max_concurrent:
            assert sum(1 for e in running if e.task_type == t) <= cap.need.max_concurrent
            assert led.claimed[t] <= cap.need.max_concurrent


@settings(max_examples=300, deadline=None)
@given(
    res=workers_st,
    caps=st.dictionaries(st.sampled_from(["PC1", "PC2", "C2", "AP"]), st.integers(1, 5)),
    stream=st.lists(
        st.tuples(st.booleans(), st.sampled_from(TYPES), st.sampled_from(SIZES), st.integers()),
        max_size=120,
    ),
)
def test_ledger_never_overcommits(
    res: WorkerResources,
    caps: dict[str, int],
    stream: list[tuple[bool, TaskType, int, int]],
) -> None:
    overrides = parse_overrides({f"{k}_MAX_CONCURRENT": v for k, v in caps.items()})
    led = Ledger(res)
    held: list[int] = []
    next_id = 0
    for admit, task, size, pick in stream:
        if admit or not held:
            need = resource_spec(task, size, overrides)
            if led.refusal(task, need) is None:
                next_id += 1
                led.add(next_id, task, need)
                held.append(next_id)
        else:
            led.free(held.pop(pick % len(held)))
        check_invariants(led)
    for sid in held:
        led.free(sid)
    assert led.cpu_used == 0 and led.mem_min_used == 0 and led.mem_max_used == 0
    assert not led.bases and not +led.counts


def walked_start_refusal(led: Ledger, task: TaskType, need: Resources) -> str | None:
    """`start_refusal` as the walk over every entry that it replaced (the reference)."""
    mine = [e for e in led.entries.values() if not e.computing and e.task_type == task]
    cpu = led.cpu_used + sum(e.threads for e in mine)
    gpu = led.gpu_used + (sum(e.need.gpu_utilization for e in mine) if led.resources.gpus else 0)
    return led._refusal(task, need, led.counts[task], cpu, gpu, mem=False)


@settings(max_examples=300, deadline=None)
@given(
    res=workers_st,
    stream=st.lists(
        st.tuples(st.sampled_from(["claim", "add", "acquire", "free"]), st.sampled_from(TYPES)),
        max_size=120,
    ),
    size=st.sampled_from(SIZES),
)
def test_start_refusal_counts_claims_of_its_type_as_the_walk_did(
    res: WorkerResources, stream: list[tuple[str, TaskType]], size: int
) -> None:
    # Claims (placed, still fetching) of a task's own type count as computing when asking
    # whether it could start: kept per type now, the answer must be the walk's.
    led = Ledger(res)
    ids: list[int] = []
    for n, (op, task) in enumerate(stream):
        need = resource_spec(task, size)
        if op in ("claim", "add") and led.claim_refusal(task, need) is None:
            led.add(n, task, need, computing=op == "add" and led.refusal(task, need) is None)
            ids.append(n)
        elif op == "acquire" and ids:
            sid = ids[n % len(ids)]
            e = led.entries[sid]
            if led.compute_refusal(e.task_type, e.need) is None:
                led.acquire(sid)
        elif op == "free" and ids:
            led.free(ids.pop(n % len(ids)))
        check_invariants(led)
        for t in TYPES:
            probe = resource_spec(t, size)
            assert led.start_refusal(t, probe) == walked_start_refusal(led, t, probe)


@settings(max_examples=40, deadline=None)
@given(
    specs=st.lists(workers_st, min_size=1, max_size=5),
    tasks=st.lists(st.tuples(st.sampled_from(TYPES), st.sampled_from(SIZES)), max_size=60),
    seed=st.integers(0, 1000),
)
def test_scheduler_never_overcommits_any_worker(
    specs: list[WorkerResources], tasks: list[tuple[TaskType, int]], seed: int
) -> None:
    """Random workers and task streams through the whole scheduler, finishing at random."""
    rng = random.Random(seed)

    async def main() -> None:
        sched = Scheduler()
        for i, res in enumerate(specs):
            sched.add_worker(WorkerSpec(f"w{i}", res, task_types=frozenset(TYPES)))

        async def work(job: object) -> None:
            for w in sched.enabled_workers():
                check_invariants(w.ledger)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)

        def fits_somewhere(task: TaskType, size: int) -> bool:
            need = resource_spec(task, size)
            return any(Ledger(res).refusal(task, need) is None for res in specs)

        # A task no worker could ever hold would wait forever, correctly; leave those out.
        calls = [
            asyncio.wait_for(
                sched.schedule(SectorRef(1000, n, size), task, TaskSelector(), None, work),
                timeout=HANG_GUARD,
            )
            for n, (task, size) in enumerate(tasks)
            if fits_somewhere(task, size)
        ]
        results = await asyncio.gather(*calls)
        assert results == [None] * len(calls)
        for w in sched.enabled_workers():
            assert not w.ledger.entries

    asyncio.run(main())


def test_base_memory_is_charged_once_per_type() -> None:
    res = WorkerResources(cpus=64, mem_physical=512 * GIB)
    led = Ledger(res)
    c2 = resource_spec(TaskType.COMMIT2, 32 << 30)
    led.add(1, TaskType.COMMIT2, c2)
    led.add(2, TaskType.COMMIT2, c2)
    # 2 x 30 GiB + one 32 GiB base, not two.
    assert led.mem_min_used == 2 * 30 * GIB + 32 * GIB
    led.free(1)
    assert led.mem_min_used == 30 * GIB + 32 * GIB
    led.free(2)
    assert led.mem_min_used == 0


def test_refusal_reasons_read_like_an_operator_would_say_them() -> None:
    res = WorkerResources(cpus=4, mem_physical=100 * GIB, gpus=("g0",))
    led = Ledger(res)
    pc1 = resource_spec(TaskType.PRE_COMMIT1, 32 << 30)
    led.add(1, TaskType.PRE_COMMIT1, pc1)
    # 100 GiB - 56 GiB - the 10 MiB of PC1 base memory.
    assert led.refusal(TaskType.PRE_COMMIT1, pc1) == "needs 56 GiB RAM, 43.99 GiB free"
    c2 = resource_spec(TaskType.COMMIT2, 2 << 10)
    led.add(2, TaskType.COMMIT2, c2)
    assert led.refusal(TaskType.COMMIT2, c2) == "needs 1 GPU, 0 free"
    capped = resource_spec(TaskType.ADD_PIECE, 2 << 10, parse_overrides({"AP_MAX_CONCURRENT": 1}))
    led.add(3, TaskType.ADD_PIECE, capped)
    assert led.refusal(TaskType.ADD_PIECE, capped) == "AP MAX_CONCURRENT 1 reached"
