"""The scheduler's shortcuts: yes/no answers that skip a worker must agree with the words.

The balanced cycle skips workers without asking for a verdict in words when a cheaper test
already says no (`rules.policy_blocks`, `rules.files_block`, `selectors.placeable_on`), and
the storage index answers its hot lookups without building dicts. Each shortcut is checked
against the full rule it stands for, and the cycle is checked to ask one worker, not every
worker, about a task only one of them can take.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run, settle

from sectorfsm.sched.assigners import Candidate, Fit
from sectorfsm.sched.filetypes import FileType, space_needed
from sectorfsm.sched.ledger import WorkerResources
from sectorfsm.sched.policy import WorkerPolicy
from sectorfsm.sched.queue import Request
from sectorfsm.sched.rules import files_block, policy_blocks, policy_refusal
from sectorfsm.sched.scheduler import Job, Scheduler
from sectorfsm.sched.selectors import (
    AllocSelector,
    ExistingSelector,
    PinnedSelector,
    TaskSelector,
    placeable_on,
)
from sectorfsm.sched.storage import SectorRef, StorageIndex, StoragePath
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sched.workers import Worker, WorkerSpec

AP = TaskType.ADD_PIECE
PC1 = TaskType.PRE_COMMIT1
PC2 = TaskType.PRE_COMMIT2
C1 = TaskType.COMMIT1
C2 = TaskType.COMMIT2
FIN = TaskType.FINALIZE
SECTOR = ("t01000", 7)
GIB = 1 << 30
TIB = 1 << 40
S32 = 32 << 30
U, S, C = FileType.UNSEALED, FileType.SEALED, FileType.CACHE


@dataclass
class View:
    """A worker as the rules see it; `local` are the files of SECTOR on its paths."""

    counts: dict[str, int]
    disk_used: int
    ap_disk_used: int
    out_of_space: bool
    local: FileType

    def stage_count(self, stage: str) -> int:
        return self.counts.get(stage, 0)

    def holds(self, sector: object, files: FileType) -> bool:
        assert sector == SECTOR
        return files & self.local == files


def _policies(rng: random.Random, n: int) -> list[WorkerPolicy]:
    caps = (None, 0, 1, 3)
    out = []
    for _ in range(n):
        out.append(
            WorkerPolicy(
                add_piece_max=rng.choice(caps),
                pre_commit1_max=rng.choice(caps),
                pre_commit2_max=rng.choice(caps),
                commit2_max=rng.choice(caps),
                disk_hold_max=rng.choice((0, 15, 40)),
                ap_disk_hold_max=rng.choice((0, 1, 3)),
                force_p1_from_local_ap=rng.random() < 0.5,
                force_p2_from_local_p1=rng.random() < 0.5,
                force_c2_from_local_p2=rng.random() < 0.5,
                is_plan_offline=rng.random() < 0.1,
                allow_p2c2_parallel=rng.random() < 0.5,
                ignore_out_of_space=rng.random() < 0.5,
            )
        )
    return out


def _views(rng: random.Random, n: int) -> list[View]:
    locals_ = [FileType(b) for b in (0, U, C, U | C, U | S | C)]
    return [
        View(
            counts={s: rng.choice((0, 1, 3)) for s in ("AP", "PC1", "PC2", "C2")},
            disk_used=rng.choice((0, 14, 30, 45)),
            ap_disk_used=rng.choice((0, 1, 3)),
            out_of_space=rng.random() < 0.3,
            local=rng.choice(locals_),
        )
        for _ in range(n)
    ]


def test_yes_no_shortcuts_only_refuse_where_the_words_refuse() -> None:
    rng = random.Random(17)
    blocked = files = 0
    for policy, view in itertools.product(_policies(rng, 120), _views(rng, 60)):
        for task in (AP, PC1, PC2, C1, C2, FIN):
            words = policy_refusal(policy, task, SECTOR, view)
            if policy_blocks(policy, task, view):
                blocked += 1
                assert words is not None, (policy, task, view)
            if files_block(policy, task, SECTOR, view):
                files += 1
                assert words is not None, (policy, task, view)
    # Neither shortcut is vacuous: both skip a good share of the refused cases.
    assert blocked > 10_000 and files > 3_000


def test_policy_blocks_sees_every_sector_independent_refusal() -> None:
    open_ = WorkerPolicy()
    idle = View({}, 0, 0, False, FileType.NONE)
    assert not any(policy_blocks(open_, t, idle) for t in TaskType)
    full = dataclasses.replace(idle, counts={"AP": 1, "PC1": 1, "PC2": 1, "C2": 1})
    capped = WorkerPolicy(add_piece_max=1, pre_commit1_max=1, pre_commit2_max=1, commit2_max=1)
    assert all(policy_blocks(capped, t, full) for t in (AP, PC1, PC2, C2))
    assert not policy_blocks(capped, C1, full)  # C1 has no cap
    assert policy_blocks(WorkerPolicy(is_plan_offline=True), C1, idle)
    no_space = dataclasses.replace(idle, out_of_space=True)
    assert policy_blocks(open_, AP, no_space) and policy_blocks(open_, PC1, no_space)
    ignoring = WorkerPolicy(ignore_out_of_space=True)
    assert policy_blocks(ignoring, AP, no_space)  # disk-constrained: AP is refused outright
    assert not policy_blocks(ignoring, PC1, no_space)  # PC1 depends on the sector's cache
    serial = WorkerPolicy(allow_p2c2_parallel=False)
    assert policy_blocks(serial, PC2, dataclasses.replace(idle, counts={"C2": 1}))
    assert policy_blocks(serial, C2, dataclasses.replace(idle, counts={"PC2": 1}))


# --- the storage index's lookups ---------------------------------------------------------------


Model = dict[tuple[SectorRef, FileType], set[str]]


def _find(model: Model, sector: SectorRef, files: FileType) -> dict[str, FileType]:
    found: dict[str, FileType] = {}
    for f in files.each():
        for pid in model.get((sector, f), ()):
            found[pid] = found.get(pid, FileType.NONE) | f
    return found


def _holders(index: StorageIndex, model: Model, sector: SectorRef, files: FileType) -> set[str]:
    per_worker: dict[str, FileType] = {}
    for pid, held in _find(model, sector, files).items():
        worker = index.paths[pid].worker
        if worker is not None:
            per_worker[worker] = per_worker.get(worker, FileType.NONE) | held
    return {w for w, held in per_worker.items() if held & files == files}


def test_index_lookups_match_their_definitions() -> None:
    rng = random.Random(3)
    index = StorageIndex()
    for w in ("a", "b", "c"):
        index.declare(StoragePath(f"{w}-1", w, 40 * TIB))
        index.declare(StoragePath(f"{w}-2", w, 2 * TIB, can_seal=rng.random() < 0.5))
    index.declare(StoragePath("store", None, 100 * TIB, can_seal=False, can_store=True))
    index.declare(StoragePath("idle", "d", 1 * TIB, can_seal=False))
    index.declare(StoragePath("tiny", "e", 100 * GIB))
    sectors = [SectorRef(1000, n, S32) for n in range(12)]
    sets = [FileType(b) for b in range(8)]
    model: Model = {}
    for _ in range(300):
        s, files, pid = rng.choice(sectors), rng.choice(sets), rng.choice(list(index.paths))
        if rng.random() < 0.7:
            index.add_sector(s, files, pid)
            for f in files.each():
                model.setdefault((s, f), set()).add(pid)
        else:
            one = pid if rng.random() < 0.5 else None
            index.remove_sector(s, files, one)
            for f in files.each():
                held = model.get((s, f), set())
                held -= {one} if one is not None else set(held)
        for s2, f2 in itertools.product(sectors[:4], sets):
            assert index.find_sector(s2, f2) == _find(model, s2, f2)
            holders = _holders(index, model, s2, f2)
            assert index.holders(s2, f2) == holders
            assert index.has_any(s2, f2) == bool(_find(model, s2, f2))
            for w in ("a", "b", "c", "d"):
                assert index.worker_holds(w, s2, f2) == (w in holders)
    # A path declared again for another worker moves what it holds with it.
    index.declare(StoragePath("c-1", "d", 40 * TIB))
    for s2, f2 in itertools.product(sectors, sets):
        assert index.holders(s2, f2) == _holders(index, model, s2, f2)
    need = space_needed(C | S, S32)
    assert index.lacks_room("e", need)
    for w in ("a", "b", "c", "d", "e", "nobody"):
        sealing = [p.available for p in index.worker_paths(w) if p.can_seal]
        assert index.lacks_room(w, need) == (bool(sealing) and max(sealing) < need)
    assert not index.lacks_room("d", need)  # no sealing path: never "out of space"


def test_placeable_on_names_the_only_workers_a_selector_could_take() -> None:
    index = StorageIndex()
    for w in ("a", "b", "c"):
        index.declare(StoragePath(f"{w}-1", w, 40 * TIB))
    s = SectorRef(1000, 1, S32)
    index.add_sector(s, C | S, "b-1")
    assert placeable_on(PinnedSelector(AllocSelector(U), "c"), s, index) == {"c"}
    assert placeable_on(ExistingSelector(C | S), s, index) == {"b"}
    assert placeable_on(PinnedSelector(ExistingSelector(C), "a"), s, index) == set()
    assert placeable_on(ExistingSelector(C | S, allow_fetch=True), s, index) is None
    assert placeable_on(TaskSelector(), s, index) is None


# --- the balanced cycle asks one worker, not all of them --------------------------------------


BIG = WorkerResources(cpus=64, mem_physical=1024 * GIB, mem_swap=0)
NAMES = [f"w{i:02d}" for i in range(12)]


def _sched(policy: Path) -> Scheduler:
    sched = Scheduler()
    for name in NAMES:
        path = StoragePath(f"{name}-ssd", name, 40 * TIB)
        sched.add_worker(WorkerSpec(name, BIG, paths=(path,), policy_file=policy))
    return sched


def test_pc1_forced_local_is_offered_to_the_holder_only_and_diag_keeps_its_words(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(
        json.dumps(
            {"AddPieceMax": 2, "PreCommit1Max": 1, "ForceP1FromLocalAP": True, "AllowDelay": 0}
        )
    )
    release = asyncio.Event()

    async def work(job: Job) -> str:
        await release.wait()
        return job.worker.name

    async def main() -> None:
        sched = _sched(policy)
        await settle()
        sel = AllocSelector(C | S, fetch=U)
        first, second = SectorRef(1000, 1, S32), SectorRef(1000, 2, S32)
        for s in (first, second):
            sched.index.add_sector(s, U, "w07-ssd")
        before = sched.checks
        one = asyncio.create_task(sched.schedule(first, PC1, sel, None, work))
        await settle()
        # Eleven workers refuse it by policy (its unsealed file is on w07): one offer, not 12.
        assert sched.checks - before == 1
        before = sched.checks
        two = asyncio.create_task(sched.schedule(second, PC1, sel, None, work))
        await settle()
        assert sched.checks - before == 1  # w07 only, and its cap holds it back
        reasons = sched.diag()[0].reasons
        assert reasons["w07"] == "PC1 cap 1 reached (PreCommit1Max)"
        assert reasons["w03"] == "sector unsealed file is not on this worker (ForceP1FromLocalAP)"
        release.set()
        assert await one == "w07" and await two == "w07"
        await sched.stop()

    run(main)


def test_a_pinned_task_is_offered_to_its_worker_only(tmp_path: Path) -> None:
    policy = tmp_path / "myscheduler.json"
    policy.write_text(json.dumps({"AddPieceMax": 2, "PreCommit1Max": 2, "AllowDelay": 0}))

    async def work(job: Job) -> str:
        return job.worker.name

    async def main() -> None:
        sched = _sched(policy)
        await settle()
        before = sched.checks
        sel = PinnedSelector(AllocSelector(U), "w05")
        assert await sched.schedule(SectorRef(1000, 1, S32), AP, sel, None, work) == "w05"
        assert sched.checks - before == 1
        await sched.stop()

    run(main)


def test_verdict_with_the_cycles_fit_says_what_it_says_alone() -> None:
    """A `Fit` the cycle asked once per worker gives the verdict it would reach by itself."""
    small = WorkerResources(cpus=64, mem_physical=256 * GIB, mem_swap=0, gpus=("g0",))

    async def main() -> None:
        sched = Scheduler()
        for name in ("a", "b"):
            path = StoragePath(f"{name}-ssd", name, 40 * TIB)
            sched.add_worker(WorkerSpec(name, small, paths=(path,)))
        sel = ExistingSelector(C | S, allow_fetch=True)
        done = asyncio.Event()

        async def work(job: Job) -> str:
            await done.wait()
            return job.worker.name

        sectors = [SectorRef(1000, n, S32) for n in range(4)]
        for s in sectors:
            sched.index.add_sector(s, C | S, "a-ssd")
        held = [asyncio.create_task(sched.schedule(s, PC2, sel, None, work)) for s in sectors]
        await settle()
        seen = set()
        for req in sched.queue:
            for w in (sched.worker("a"), sched.worker("b")):
                fit = sched.fit(w, req.task_type, req.sector.size)
                alone = sched.verdict(req, w)
                if isinstance(fit, str):
                    assert alone == fit  # the ledger's refusal, in the same words
                else:
                    assert sched.verdict(req, w, fit) == alone
                seen.add(type(alone))
        assert str in seen  # queued tasks: the ledgers refused some, in words
        done.set()
        await asyncio.gather(*held)
        await sched.stop()

    run(main)


def test_a_busy_worker_is_not_asked_about_a_task_a_holder_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy worker, and a PC2 whose files are on another PC2 worker: no verdict needed."""
    one_gpu = WorkerResources(cpus=64, mem_physical=256 * GIB, mem_swap=0, gpus=("g0",))
    release = asyncio.Event()

    async def work(job: Job) -> str:
        await release.wait()
        return job.worker.name

    async def main() -> None:
        sched = Scheduler()
        for name in ("a", "b"):
            path = StoragePath(f"{name}-ssd", name, 40 * TIB)
            sched.add_worker(WorkerSpec(name, one_gpu, frozenset({PC2}), paths=(path,)))
        sel = ExistingSelector(C | S, allow_fetch=True)
        on_b, *on_a = [SectorRef(1000, n, S32) for n in range(3)]
        sched.index.add_sector(on_b, C | S, "b-ssd")
        for s in on_a:
            sched.index.add_sector(s, C | S, "a-ssd")
        jobs = [asyncio.create_task(sched.schedule(s, PC2, sel, None, work)) for s in [on_b]]
        await settle()
        jobs += [asyncio.create_task(sched.schedule(s, PC2, sel, None, work)) for s in on_a]
        await settle()
        assert len(sched.queue) == 1  # a and b each run one; the last waits for a
        asked: list[str] = []
        verdict = sched.verdict

        def spy(req: Request, w: Worker, fit: Fit | None = None) -> Candidate | str:
            asked.append(w.name)
            return verdict(req, w, fit)

        monkeypatch.setattr(sched, "verdict", spy)
        sched.worker_changed("b")
        await settle()
        assert asked == []  # b is busy and a holds the files and does PC2: skipped unasked
        assert len(sched.queue) == 1
        words = sched.diag()[0].reasons["b"]
        assert words == "needs 1 GPU, 0 free; a holds the sector's files and does PC2"
        release.set()
        assert sorted(await asyncio.gather(*jobs)) == ["a", "a", "b"]
        await sched.stop()

    run(main)
