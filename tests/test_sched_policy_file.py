"""The worker policy file: parsing myScheduler's names, loading JSON/TOML, hot reload."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from sectorfsm.sched.policy import (
    MYSCHEDULER_DEFAULTS,
    PolicyError,
    PolicyWatcher,
    WorkerPolicy,
    load_policy,
    parse_policy,
    write_default,
)

OPEN = WorkerPolicy()

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


def pol(**changes: object) -> WorkerPolicy:
    return dataclasses.replace(OPEN, **changes)  # type: ignore[arg-type]


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
        allow_delay=3.0,  # omitted: myScheduler's default
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
    assert got.allow_delay == 1.0


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
    assert list(MYSCHEDULER_DEFAULTS.as_myscheduler()) == [*list(DOC_FILE), "AllowDelay"]


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
        ("a.json", "", r"invalid JSON: the file is empty \(`\{\}` is the default policy\)"),
        ("a.json", " \n", "invalid JSON: the file is empty"),
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
    written = {**DOC_FILE, "AllowDelay": 3}  # the manual lists AllowDelay last, default 3
    assert json.loads(p.read_text()) == written
    assert list(json.loads(p.read_text())) == list(written)  # myScheduler's order
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


def test_a_file_emptied_a_moment_ago_is_a_save_in_progress_not_an_error(tmp_path: Path) -> None:
    """Editors that truncate before writing leave an empty file for an instant: no error then."""
    p = tmp_path / "myscheduler.json"
    put(p, '{"PreCommit1Max": 4}', T0)
    w = PolicyWatcher(p)
    good = w.policy
    put(p, "", time.time_ns())  # emptied just now: the new content has not been written yet
    assert w.poll() is False
    assert (w.policy, w.error) == (good, None)
    put(p, '{"PreCommit1Max": 5}', time.time_ns())  # the editor's write lands
    assert w.poll() is True
    assert (w.policy.pre_commit1_max, w.error) == (5, None)
    # A file that stays empty past the mtime's trust window is a bad edit, and said.
    put(p, "", T0 + 1)
    assert w.poll() is False
    assert w.policy.pre_commit1_max == 5
    assert w.error == (
        f"{p}: invalid JSON: the file is empty (`{{}}` is the default policy); "
        "keeping the last good policy"
    )


def test_an_empty_file_before_any_good_one_still_fails_closed(tmp_path: Path) -> None:
    p = tmp_path / "myscheduler.json"
    put(p, "", time.time_ns())
    w = PolicyWatcher(p)
    assert w.policy == MYSCHEDULER_DEFAULTS
    assert w.error is not None and "every stage is disabled" in w.error
