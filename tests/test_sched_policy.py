"""Worker policy rules: myScheduler's limits and locality rules one by one, and disk units.

The policy file itself (parsing, loading, hot reload) is tested in test_sched_policy_file.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.policy import MYSCHEDULER_DEFAULTS, WorkerPolicy
from sectorfsm.sched.rules import WorkerView, disk_units, policy_refusal
from sectorfsm.sched.tasks import TaskType

AP = TaskType.ADD_PIECE
PC1 = TaskType.PRE_COMMIT1
PC2 = TaskType.PRE_COMMIT2
C1 = TaskType.COMMIT1
C2 = TaskType.COMMIT2
SEALING = (AP, PC1, PC2, C1, C2)
SECTOR = ("t01000", 7)
OPEN = WorkerPolicy()
ALL_LOCAL = FileType.UNSEALED | FileType.SEALED | FileType.CACHE


@dataclass
class View:
    """A worker as the rules see it; `local` are the files of SECTOR on its paths."""

    counts: dict[str, int] = field(default_factory=dict)
    disk_used: int = 0
    ap_disk_used: int = 0
    out_of_space: bool = False
    local: FileType = FileType.NONE
    asked: list[FileType] = field(default_factory=list)

    def stage_count(self, stage: str) -> int:
        assert stage in {"AP", "PC1", "PC2", "C2"}, stage
        return self.counts.get(stage, 0)

    def holds(self, sector: object, files: FileType) -> bool:
        assert sector == SECTOR
        self.asked.append(files)
        return files & self.local == files


def refusal(policy: WorkerPolicy, task: TaskType, view: WorkerView) -> str | None:
    return policy_refusal(policy, task, SECTOR, view)


def pol(**changes: object) -> WorkerPolicy:
    return dataclasses.replace(OPEN, **changes)  # type: ignore[arg-type]


# --- rules -----------------------------------------------------------------------------------


def test_no_policy_restricts_nothing() -> None:
    busy = View(counts={"AP": 99, "PC1": 99, "PC2": 99, "C2": 99}, disk_used=10**6)
    for task in TaskType:
        assert refusal(OPEN, task, busy) is None, task
    assert busy.asked == []  # nothing needed locality, so the index was never asked


CAPS = [
    (AP, "add_piece_max", "AddPieceMax"),
    (PC1, "pre_commit1_max", "PreCommit1Max"),
    (PC2, "pre_commit2_max", "PreCommit2Max"),
    (C2, "commit2_max", "Commit2Max"),
]


@pytest.mark.parametrize(("task", "attr", "knob"), CAPS)
def test_stage_cap(task: TaskType, attr: str, knob: str) -> None:
    policy = pol(**{attr: 4})
    assert refusal(policy, task, View(counts={task.short: 3})) is None
    expected = f"{task.short} cap 4 reached ({knob})"
    assert refusal(policy, task, View(counts={task.short: 4})) == expected
    assert refusal(policy, task, View(counts={task.short: 9})) == expected  # cap lowered
    # Only this stage's count matters.
    others = {s: 50 for s in ("AP", "PC1", "PC2", "C2") if s != task.short}
    assert refusal(policy, task, View(counts=others)) is None


def test_pc1_cap_message_as_operators_read_it() -> None:
    view = View(counts={"PC1": 4}, local=ALL_LOCAL)
    assert refusal(pol(pre_commit1_max=4), PC1, view) == "PC1 cap 4 reached (PreCommit1Max)"


@pytest.mark.parametrize(("task", "attr", "knob"), CAPS)
def test_cap_zero_disables_the_stage(task: TaskType, attr: str, knob: str) -> None:
    got = refusal(pol(**{attr: 0}), task, View(local=ALL_LOCAL))
    assert got == f"{task.short} disabled on this worker ({knob} = 0)"


def test_pc2_disabled_message() -> None:
    got = refusal(pol(pre_commit2_max=0), PC2, View(local=ALL_LOCAL))
    assert got == "PC2 disabled on this worker (PreCommit2Max = 0)"


@pytest.mark.parametrize(("task", "attr", "knob"), CAPS)
def test_no_cap_means_unlimited(task: TaskType, attr: str, knob: str) -> None:
    assert getattr(OPEN, attr) is None
    assert refusal(OPEN, task, View(counts={task.short: 10**6})) is None


def test_c1_and_other_tasks_are_never_capped() -> None:
    zero = pol(add_piece_max=0, pre_commit1_max=0, pre_commit2_max=0, commit2_max=0)
    view = View(counts={"AP": 9, "PC1": 9, "PC2": 9, "C2": 9})
    for task in TaskType:
        if task in (AP, PC1, PC2, C2):
            assert refusal(zero, task, view) is not None, task
        else:
            assert refusal(zero, task, view) is None, task


def test_drain_refuses_every_new_sealing_task_and_nothing_else() -> None:
    drain = pol(is_plan_offline=True)
    idle_local = View(local=ALL_LOCAL)
    for task in TaskType:
        expected = "draining (IsPlanOffline)" if task in SEALING else None
        assert refusal(drain, task, idle_local) == expected, task
    for task in SEALING:
        assert refusal(pol(is_plan_offline=False), task, idle_local) is None


def test_force_p1_from_local_ap() -> None:
    bound = pol(force_p1_from_local_ap=True)
    view = View(local=FileType.NONE)
    assert refusal(bound, PC1, view) == (
        "sector unsealed file is not on this worker (ForceP1FromLocalAP)"
    )
    assert view.asked == [FileType.UNSEALED]
    assert refusal(bound, PC1, View(local=FileType.UNSEALED)) is None
    # A local cache is not what this binding asks for.
    assert refusal(bound, PC1, View(local=FileType.CACHE)) is not None
    assert refusal(pol(force_p1_from_local_ap=False), PC1, View()) is None


def test_force_p2_from_local_p1() -> None:
    bound = pol(force_p2_from_local_p1=True)
    view = View(local=FileType.UNSEALED)
    assert refusal(bound, PC2, view) == "sector cache is not on this worker (ForceP2FromLocalP1)"
    assert view.asked == [FileType.CACHE]
    assert refusal(bound, PC2, View(local=FileType.CACHE)) is None
    assert refusal(pol(force_p2_from_local_p1=False), PC2, View()) is None
    assert refusal(bound, C2, View()) is None  # binds PC2 only


@pytest.mark.parametrize("task", [C2, C1])
def test_force_c2_from_local_p2_binds_c1_and_c2(task: TaskType) -> None:
    bound = pol(force_c2_from_local_p2=True)
    assert refusal(bound, task, View(local=FileType.SEALED)) == (
        "sector cache is not on this worker (ForceC2FromLocalP2)"
    )
    assert refusal(bound, task, View(local=FileType.CACHE)) is None
    assert refusal(pol(force_c2_from_local_p2=False), task, View()) is None
    assert refusal(bound, PC2, View()) is None  # binds C1/C2 only


def test_disk_hold_for_pc1_counts_14_units() -> None:
    hold = pol(disk_hold_max=60)
    assert refusal(hold, PC1, View(disk_used=46)) is None  # 46+14 = 60 fits
    assert refusal(hold, PC1, View(disk_used=47)) == "disk hold 47+14 > 60 units (DiskHoldMax)"
    assert refusal(hold, PC1, View(disk_used=58)) == "disk hold 58+14 > 60 units (DiskHoldMax)"


def test_disk_hold_for_pc1_spares_a_cache_already_local() -> None:
    hold = pol(disk_hold_max=60)
    assert refusal(hold, PC1, View(disk_used=58, local=FileType.CACHE)) is None
    # Also in the disk-constrained mode: a PC1 that already started here may finish.
    assert refusal(hold, PC1, View(disk_used=61, local=FileType.CACHE)) is None


def test_disk_hold_for_ap_counts_one_unit() -> None:
    hold = pol(disk_hold_max=60)
    assert refusal(hold, AP, View(disk_used=59)) is None
    assert refusal(hold, AP, View(disk_used=60)) == "disk hold 60+1 > 60 units (DiskHoldMax)"


def test_disk_hold_zero_is_unlimited() -> None:
    huge = View(disk_used=10**6, ap_disk_used=10**6)
    for task in SEALING:
        assert refusal(pol(disk_hold_max=0, ap_disk_hold_max=0), task, huge) is None


def test_disk_constrained_mode() -> None:
    hold = pol(disk_hold_max=60)
    over, full = View(disk_used=61), View(disk_used=60)
    assert refusal(hold, AP, over) == "disk-constrained: 61 units held > 60 (DiskHoldMax)"
    for task in (PC1, PC2, C1, C2):
        got = refusal(hold, task, View(disk_used=61))
        assert got == (
            "disk-constrained: 61 units held > 60 (DiskHoldMax), "
            "and the sector cache is not on this worker"
        ), task
        assert refusal(hold, task, View(disk_used=61, local=FileType.CACHE)) is None, task
    # At exactly the hold the worker is not constrained; PC2..C2 need no more room.
    for task in (PC2, C1, C2):
        assert refusal(hold, task, full) is None, task
    assert refusal(hold, AP, over) is not None
    assert refusal(pol(disk_hold_max=0), PC2, over) is None


def test_ap_disk_hold() -> None:
    hold = pol(ap_disk_hold_max=5)
    assert refusal(hold, AP, View(ap_disk_used=4)) is None
    assert refusal(hold, AP, View(ap_disk_used=5)) == ("AP disk hold 5+1 > 5 units (APDiskHoldMax)")
    assert refusal(hold, PC1, View(ap_disk_used=5)) is None  # limits AP only
    assert refusal(pol(ap_disk_hold_max=0), AP, View(ap_disk_used=10**6)) is None


def test_p2c2_parallel_off_keeps_pc2_and_c2_apart() -> None:
    serial = pol(allow_p2c2_parallel=False)
    assert refusal(serial, PC2, View(counts={"C2": 1})) == (
        "a C2 is running and AllowP2C2Parallel is off"
    )
    assert refusal(serial, C2, View(counts={"PC2": 1})) == (
        "a PC2 is running and AllowP2C2Parallel is off"
    )
    assert refusal(serial, PC2, View(counts={"PC2": 3})) is None
    assert refusal(serial, C2, View(counts={"C2": 3})) is None
    assert refusal(serial, C1, View(counts={"PC2": 1, "C2": 1})) is None


def test_p2c2_parallel_on() -> None:
    both = View(counts={"PC2": 1, "C2": 1})
    assert refusal(pol(allow_p2c2_parallel=True), PC2, both) is None
    assert refusal(pol(allow_p2c2_parallel=True), C2, both) is None


def test_out_of_space_without_ignore_refuses_ap_and_pc1() -> None:
    strict = pol(ignore_out_of_space=False)
    local = View(out_of_space=True, local=ALL_LOCAL)
    for task in (AP, PC1):
        assert refusal(strict, task, local) == "out of space (IgnoreOutOfSpace is off)", task
    # What reads a local cache still runs; what would fetch one does not.
    for task in (PC2, C1, C2):
        assert refusal(strict, task, local) is None, task
        got = refusal(strict, task, View(out_of_space=True))
        assert got == (
            "out of space (IgnoreOutOfSpace is off), and the sector cache is not on this worker"
        )


def test_out_of_space_with_ignore_works_disk_constrained() -> None:
    lax = pol(ignore_out_of_space=True)
    assert refusal(lax, AP, View(out_of_space=True)) == (
        "out of space, disk-constrained (IgnoreOutOfSpace)"
    )
    assert refusal(lax, PC1, View(out_of_space=True, local=FileType.CACHE)) is None
    assert refusal(lax, PC1, View(out_of_space=True)) == (
        "out of space, disk-constrained (IgnoreOutOfSpace), "
        "and the sector cache is not on this worker"
    )
    for task in (PC2, C1, C2):
        assert refusal(lax, task, View(out_of_space=True, local=FileType.CACHE)) is None
        assert refusal(lax, task, View(out_of_space=True)) is not None


def test_space_flags_matter_only_when_out_of_space() -> None:
    for task in SEALING:
        assert refusal(pol(ignore_out_of_space=False), task, View()) is None
        assert refusal(pol(ignore_out_of_space=True), task, View()) is None


def test_myscheduler_defaults_as_rules() -> None:
    # A fresh myscheduler.json disables every capped stage until the operator sets counts.
    for task, _, knob in CAPS:
        got = refusal(MYSCHEDULER_DEFAULTS, task, View(local=ALL_LOCAL))
        assert got == f"{task.short} disabled on this worker ({knob} = 0)"
    counts = dataclasses.replace(
        MYSCHEDULER_DEFAULTS, add_piece_max=1, pre_commit1_max=1, pre_commit2_max=1, commit2_max=1
    )
    assert refusal(counts, PC1, View()) is not None  # ForceP1FromLocalAP is on
    assert refusal(counts, PC2, View()) is not None  # ForceP2FromLocalP1 is on
    assert refusal(counts, C2, View()) is None  # ForceC2FromLocalP2 is off
    assert refusal(counts, C2, View(counts={"PC2": 1})) is not None  # no P2/C2 in parallel


def test_locality_is_asked_once_per_check() -> None:
    # Both the disk-constrained mode and ForceC2FromLocalP2 need the cache; one index lookup.
    view = View(disk_used=61, local=FileType.CACHE)
    policy = pol(disk_hold_max=60, force_c2_from_local_p2=True)
    assert refusal(policy, C2, view) is None
    assert view.asked == [FileType.CACHE]


# --- disk units ------------------------------------------------------------------------------


def test_disk_units() -> None:
    files = [
        (FileType.CACHE, True),  # SDR started: 14
        (FileType.CACHE, False),  # empty cache dir: 0
        (FileType.UNSEALED, False),  # 1, and 1 AP unit
        (FileType.UNSEALED, True),  # the flag only matters for caches
        (FileType.SEALED, False),  # 1
        (FileType.UPDATE, True),  # not counted by myScheduler
    ]
    assert disk_units(files) == (17, 2)
    assert disk_units([]) == (0, 0)
    assert disk_units(iter([(FileType.CACHE | FileType.SEALED, True)])) == (15, 0)
    # The manual's sizing: a 2 TB SSD holds about four PC1s (4 x 14 + 4 unsealed = 60).
    four = [(FileType.CACHE, True)] * 4 + [(FileType.UNSEALED, False)] * 4
    assert disk_units(four) == (60, 4)
