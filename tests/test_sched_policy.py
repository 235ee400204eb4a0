"""Worker policy: myScheduler's rules one by one, parsing, file loading and hot reload."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sectorfsm.sched.filetypes import FileType
from sectorfsm.sched.policy import (
    MYSCHEDULER_DEFAULTS,
    PolicyError,
    PolicyWatcher,
    WorkerPolicy,
    load_policy,
    parse_policy,
    write_default,
)
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

# myScheduler's file as its manual prints it (seeds/004), plus the manual's AllowDelay.
DOC_FILE = {
    "WorkerName": "",
    "AddPieceMax": 0,
    "PreCommit1Max": 0,
    "PreCommit2Max": 0,
    "Commit2Max": 0,
    "DiskHoldMax": 0,
    "APDiskHoldMax": 0,
    "ForceP1FromLocalAP": True,
    "ForceP2FromLocalP1": True,
    "ForceC2FromLocalP2": False,
    "IsPlanOffline": False,
    "AllowP2C2Parallel": False,
    "IgnoreOutOfSpace": False,
    "AutoPledgeDiff": 0,
}


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


# --- parsing ---------------------------------------------------------------------------------


def test_parse_myscheduler_file_as_printed_in_its_manual() -> None:
    data = {**DOC_FILE, "AllowDelay": 3}
    assert parse_policy(data) == MYSCHEDULER_DEFAULTS


def test_parse_myscheduler_names() -> None:
    got = parse_policy(
        {
            "WorkerName": "p1-box",
            "AddPieceMax": 2,
            "PreCommit1Max": 7,
            "PreCommit2Max": 1,
            "Commit2Max": 3,
            "DiskHoldMax": 60,
            "APDiskHoldMax": 5,
            "ForceP1FromLocalAP": False,
            "ForceP2FromLocalP1": False,
            "ForceC2FromLocalP2": True,
            "IsPlanOffline": True,
            "AllowP2C2Parallel": True,
            "IgnoreOutOfSpace": True,
        }
    )
    assert got == WorkerPolicy(
        worker_name="p1-box",
        add_piece_max=2,
        pre_commit1_max=7,
        pre_commit2_max=1,
        commit2_max=3,
        disk_hold_max=60,
        ap_disk_hold_max=5,
        force_p1_from_local_ap=False,
        force_p2_from_local_p1=False,
        force_c2_from_local_p2=True,
        is_plan_offline=True,
        allow_p2c2_parallel=True,
        ignore_out_of_space=True,
    )


def test_parse_snake_names_and_mixed() -> None:
    got = parse_policy(
        {
            "worker_name": "c2-box",
            "commit2_max": 2,
            "disk_hold_max": 40,
            "force_p2_from_local_p1": False,
            "AllowP2C2Parallel": True,
            "auto_pledge_diff": 5,
            "allow_delay": 1,
        }
    )
    assert (got.worker_name, got.commit2_max, got.disk_hold_max) == ("c2-box", 2, 40)
    assert (got.force_p2_from_local_p1, got.allow_p2c2_parallel) == (False, True)


def test_omitted_keys_take_myscheduler_defaults_not_the_dataclass_ones() -> None:
    assert parse_policy({}) == MYSCHEDULER_DEFAULTS
    got = parse_policy({"PreCommit1Max": 4})
    assert got.pre_commit1_max == 4
    assert (got.add_piece_max, got.pre_commit2_max, got.commit2_max) == (0, 0, 0)
    assert got.force_p1_from_local_ap and got.force_p2_from_local_p1
    assert not got.force_c2_from_local_p2 and not got.allow_p2c2_parallel
    # ... whereas no file at all restricts nothing.
    assert OPEN.add_piece_max is None and OPEN.pre_commit1_max is None
    assert not OPEN.force_p1_from_local_ap and not OPEN.force_p2_from_local_p1
    assert OPEN.allow_p2c2_parallel


def test_null_cap_means_no_cap() -> None:
    got = parse_policy({"PreCommit1Max": None, "commit2_max": None})
    assert got.pre_commit1_max is None and got.commit2_max is None


def test_as_myscheduler_round_trips() -> None:
    policy = pol(worker_name="x", pre_commit1_max=3, disk_hold_max=9, is_plan_offline=True)
    assert parse_policy(policy.as_myscheduler()) == policy
    assert list(MYSCHEDULER_DEFAULTS.as_myscheduler()) == list(DOC_FILE)[:-1]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("PreCommit1Max", "4", '"4"'),
        ("PreCommit1Max", -1, "-1"),
        ("PreCommit1Max", 1.5, "1.5"),
        ("AddPieceMax", True, "true"),
        ("commit2_max", [2], "[2]"),
        ("DiskHoldMax", None, "null"),
        ("ap_disk_hold_max", -3, "-3"),
        ("APDiskHoldMax", "5", '"5"'),
        ("IsPlanOffline", 1, "1"),
        ("ForceP1FromLocalAP", "true", '"true"'),
        ("allow_p2c2_parallel", None, "null"),
        ("WorkerName", 7, "7"),
    ],
)
def test_parse_rejects_wrong_values(key: str, value: object, shown: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy({"PreCommit2Max": 1, key: value}, source="w1/myscheduler.json")
    message = str(info.value)
    assert message.startswith("w1/myscheduler.json: ")
    assert f"{key} = {shown}: expected" in message
    assert info.value.key == key
    assert isinstance(info.value, ValueError)


def test_parse_rejects_unknown_keys_with_a_hint() -> None:
    with pytest.raises(PolicyError, match=r"^src: unknown key PreCommit1max = 4 \(did you mean "):
        parse_policy({"PreCommit1max": 4}, source="src")
    with pytest.raises(PolicyError, match=r"^<policy>: unknown key Bogus = true$"):
        parse_policy({"Bogus": True})


def test_parse_rejects_one_field_given_twice() -> None:
    with pytest.raises(PolicyError, match="PreCommit1Max is already given"):
        parse_policy({"PreCommit1Max": 4, "pre_commit1_max": 5})


def test_policy_rejects_negative_numbers_in_code() -> None:
    with pytest.raises(ValueError, match="pre_commit1_max must be >= 0"):
        WorkerPolicy(pre_commit1_max=-1)
    with pytest.raises(ValueError, match="disk_hold_max must be >= 0"):
        WorkerPolicy(disk_hold_max=-1)


# --- files -----------------------------------------------------------------------------------


def test_load_json_and_toml(tmp_path: Path) -> None:
    j = tmp_path / "myscheduler.json"
    j.write_text(json.dumps({**DOC_FILE, "PreCommit1Max": 6, "AllowDelay": 3}))
    assert load_policy(j).pre_commit1_max == 6
    assert load_policy(str(j)).pre_commit1_max == 6
    t = tmp_path / "policy.toml"
    t.write_text('worker_name = "gpu1"\nCommit2Max = 2\nforce_c2_from_local_p2 = true\n')
    got = load_policy(t)
    assert (got.worker_name, got.commit2_max, got.force_c2_from_local_p2) == ("gpu1", 2, True)
    assert got.pre_commit1_max == 0  # omitted: myScheduler's default


def test_load_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    p.write_bytes(b'\xef\xbb\xbf{"PreCommit1Max": 2}')
    assert load_policy(p).pre_commit1_max == 2


def test_load_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    p.write_text('{\n  "PreCommit1Max": 4,\n}\n')
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert str(info.value).startswith(f"{p}:3:1: invalid JSON: ")
    assert (info.value.line, info.value.column) == (3, 1)


def test_load_invalid_toml_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text("commit2_max = 1\n[worker\n")
    with pytest.raises(PolicyError, match=rf"^{p}:2:8: invalid TOML: Expected '\]'"):
        load_policy(p)
    p.write_text("commit2_max = 1\npre_commit1_max =")
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert (info.value.line, info.value.column) == (2, 18)
    assert "at end of file" in str(info.value)


def test_load_bad_value_points_at_its_line(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    p.write_text('{\n  "AddPieceMax": 1,\n  "PreCommit1Max": "4"\n}\n')
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert str(info.value).startswith(f'{p}:3: PreCommit1Max = "4": expected a whole number')
    t = tmp_path / "policy.toml"
    t.write_text("# caps\n\nis_plan_offline = 1\n")
    with pytest.raises(PolicyError, match=rf"^{t}:3: is_plan_offline = 1: expected true"):
        load_policy(t)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.json", "[1, 2]", "expected a JSON object"),
        ("a.json", "", "invalid JSON"),
        ("a.json", '{"PreCommit1Max": 1, "PreCommit1Max": 2}', "duplicate key PreCommit1Max"),
        ("a.json", '{"PreCommit1Max": NaN}', "PreCommit1Max = NaN"),
        ("a.toml", "[worker]\npre_commit1_max = 1\n", "unknown key worker"),
        ("a.yaml", "PreCommit1Max: 1", "unsupported policy file type '.yaml'"),
    ],
)
def test_load_rejects_malformed_files(tmp_path: Path, name: str, content: str, match: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(PolicyError, match=match) as info:
        load_policy(p)
    assert str(p) in str(info.value)


def test_load_rejects_non_utf8(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    p.write_bytes(b'{"WorkerName": "\xff"}')
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(p)


def test_load_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "myscheduler.json")


def test_write_default(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    assert write_default(p) is True
    assert json.loads(p.read_text()) == DOC_FILE
    assert list(json.loads(p.read_text())) == list(DOC_FILE)  # myScheduler's order
    assert load_policy(p) == MYSCHEDULER_DEFAULTS
    assert p.stat().st_mode & 0o777 == 0o644
    p.write_text('{"PreCommit1Max": 4}')
    assert write_default(p) is False  # never clobbers the operator's file
    assert load_policy(p).pre_commit1_max == 4
    assert write_default(p, overwrite=True) is True
    assert load_policy(p) == MYSCHEDULER_DEFAULTS
    t = tmp_path / "policy.toml"
    assert write_default(t) is True
    assert load_policy(t) == MYSCHEDULER_DEFAULTS
    assert sorted(x.name for x in tmp_path.iterdir()) == ["myscheduler.json", "policy.toml"]


# --- hot reload ------------------------------------------------------------------------------

T0 = 1_600_000_000 * 10**9  # a fixed, long-past mtime: no timing in these tests


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def put(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_hot_reload_lifecycle(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    clock = Clock()
    w = PolicyWatcher(p, clock=clock)
    assert w.path == p
    assert (w.policy, w.error, w.loaded_at) == (WorkerPolicy(), None, None)
    assert w.poll() is False

    put(p, json.dumps({**DOC_FILE, "PreCommit1Max": 4}), T0)
    clock.now = 101.0
    assert w.poll() is True
    assert w.policy == dataclasses.replace(MYSCHEDULER_DEFAULTS, pre_commit1_max=4)
    assert (w.error, w.loaded_at) == (None, 101.0)
    assert w.poll() is False

    # A valid edit takes effect.
    put(p, json.dumps({**DOC_FILE, "PreCommit1Max": 6}), T0 + 1)
    assert w.poll() is True
    assert w.policy.pre_commit1_max == 6
    good = w.policy

    # An invalid edit is rejected: the last good policy stays, the error says where.
    put(p, '{\n  "PreCommit1Max": 8,\n  "PreCommit2Max": \n}\n', T0 + 2)
    assert w.poll() is False
    assert w.policy is good
    assert w.error is not None
    assert w.error.startswith(f"{p}:4:1: invalid JSON: ")
    assert w.error.endswith("keeping the last good policy")
    assert w.poll() is False and w.error is not None  # still broken, still said

    # So is a well-formed file with a bad value.
    put(p, '{"PreCommit1Max": "8"}', T0 + 3)
    assert w.poll() is False
    assert w.policy is good and w.error is not None and 'PreCommit1Max = "8"' in w.error

    # Fixing it clears the error.
    put(p, json.dumps({**DOC_FILE, "PreCommit1Max": 8}), T0 + 4)
    assert w.poll() is True
    assert w.policy.pre_commit1_max == 8
    assert w.error is None

    # Deleting it keeps the last good policy and says so.
    fixed = w.policy
    p.unlink()
    assert w.poll() is False
    assert w.policy is fixed
    assert w.error == f"{p}: file was deleted; keeping the last good policy"
    assert w.poll() is False and w.error is not None

    # Recreating it (same content) clears the error.
    put(p, json.dumps({**DOC_FILE, "PreCommit1Max": 8}), T0 + 5)
    assert w.poll() is False
    assert w.policy == fixed
    assert w.error is None


def test_reload_returns_false_for_an_equivalent_edit(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    put(p, '{"PreCommit1Max": 4}', T0)
    w = PolicyWatcher(p)
    assert w.policy.pre_commit1_max == 4
    put(p, '{ "PreCommit1Max" : 4 , "AllowDelay": 3 }', T0 + 1)
    assert w.poll() is False
    assert w.error is None


def test_unchanged_signature_is_not_reread(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    put(p, '{"PreCommit1Max": 4}', T0)
    w = PolicyWatcher(p)
    # Same size, inode and mtime: polling costs one stat and does not read.
    put(p, "x" * len('{"PreCommit1Max": 4}'), T0)
    assert w.poll() is False
    assert (w.policy.pre_commit1_max, w.error) == (4, None)
    # Any one of the three changing makes it read.
    os.utime(p, ns=(T0 + 1, T0 + 1))
    assert w.poll() is False
    assert w.error is not None and w.policy.pre_commit1_max == 4


def test_atomic_replace_with_same_mtime_and_size_is_seen(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    put(p, '{"PreCommit1Max": 4}', T0)
    w = PolicyWatcher(p)
    new = tmp_path / "new.json"
    put(new, '{"PreCommit1Max": 5}', T0)
    os.replace(new, p)  # what editors do: a new inode
    assert w.poll() is True
    assert w.policy.pre_commit1_max == 5


def test_same_size_rewrite_within_the_mtime_granularity_is_seen(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    # A future mtime is always "too recent to trust", without depending on timing.
    soon = time.time_ns() + 3600 * 10**9
    put(p, '{"PreCommit1Max": 4}', soon)
    w = PolicyWatcher(p)
    put(p, '{"PreCommit1Max": 5}', soon)  # same size, same mtime, same inode
    assert w.poll() is True
    assert w.policy.pre_commit1_max == 5


def test_invalid_from_the_start_fails_closed(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    put(p, '{"PreCommit1Max": 4,}', T0)
    w = PolicyWatcher(p)
    assert w.policy == MYSCHEDULER_DEFAULTS
    assert w.error is not None
    assert w.error.startswith(f"{p}:1:")
    assert w.error.endswith("every stage is disabled until the file is fixed")
    put(p, '{"PreCommit1Max": 4}', T0 + 1)
    assert w.poll() is True
    assert w.policy.pre_commit1_max == 4
    assert w.error is None


def test_created_invalid_after_start_fails_closed(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    w = PolicyWatcher(p)
    assert w.policy == OPEN
    put(p, "{", T0)
    assert w.poll() is True
    assert w.policy == MYSCHEDULER_DEFAULTS and w.error is not None


def test_min_interval_limits_stats(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    put(p, "pre_commit1_max = 1\n", T0)
    clock = Clock()
    w = PolicyWatcher(p, clock=clock, min_interval=5.0)
    assert w.policy.pre_commit1_max == 1
    put(p, "pre_commit1_max = 2\n", T0 + 1)
    clock.now += 4.9
    assert w.poll() is False and w.policy.pre_commit1_max == 1
    clock.now += 0.2
    assert w.poll() is True and w.policy.pre_commit1_max == 2
    assert w.loaded_at == clock.now


def test_watch_a_default_file(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    write_default(p)
    assert PolicyWatcher(p).policy == MYSCHEDULER_DEFAULTS


def test_watcher_rejects_an_unsupported_file_type(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="unsupported policy file type"):
        PolicyWatcher(tmp_path / "policy.yaml")


@pytest.mark.parametrize(
    ("suffix", "text"),
    [(".json", "[" * 100_000), (".toml", "a = " + "[" * 100_000)],
    ids=["json", "toml"],
)
def test_deeply_nested_file_is_a_policy_error_and_the_last_good_policy_stays(
    tmp_path: Path, suffix: str, text: str
) -> None:
    path = tmp_path / f"myscheduler{suffix}"
    path.write_text(text + "]" * 100_000)
    with pytest.raises(PolicyError, match=rf"^{path}: invalid (JSON|TOML): nested too deeply$"):
        load_policy(path)
    path.write_text(json.dumps({"PreCommit1Max": 2}) if suffix == ".json" else "PreCommit1Max = 2")
    watcher = PolicyWatcher(path)
    assert watcher.policy.pre_commit1_max == 2
    path.write_text(text + "]" * 100_000 + "\n")  # another size: the watcher reads it
    watcher.poll()
    assert watcher.policy.pre_commit1_max == 2
    assert watcher.error is not None and "nested too deeply; keeping the last good" in watcher.error
