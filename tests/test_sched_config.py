"""Declared workers from TOML: every field, and a clear error for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from sectorfsm.sched.config import WorkerConfigError, load_workers, parse_rate, parse_size
from sectorfsm.sched.tasks import TaskType

GOOD = """
[[workers]]
name = "pc1-a"
cpus = 64
memory = "512GiB"
swap = "64GiB"
gpus = ["rtx"]
tasks = ["AP", "PC1", "seal/v0/finalize"]
heartbeat_grace = 45
bandwidth = "1Gbit"
policy = "pc1-a/myscheduler.json"
resources = { PC1_32G_MAX_CONCURRENT = 4 }

[[workers.paths]]
id = "nvme"
capacity = "8TiB"

[[workers]]
name = "gpu-b"
cpus = 32
memory = 274877906944
"""


def test_a_full_config(tmp_path: Path) -> None:
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(GOOD)
    a, b = load_workers(cfg)
    assert a.name == "pc1-a" and a.resources.cpus == 64
    assert a.resources.mem_physical == 512 << 30 and a.resources.mem_swap == 64 << 30
    assert a.resources.gpus == ("rtx",)
    assert a.task_types == {TaskType.ADD_PIECE, TaskType.PRE_COMMIT1, TaskType.FINALIZE}
    assert a.heartbeat_grace == 45 and a.bandwidth == 125e6
    assert a.policy_file == tmp_path / "pc1-a" / "myscheduler.json"
    assert a.overrides is not None
    assert a.overrides[(TaskType.PRE_COMMIT1, 32 << 30)].max_concurrent == 4
    (p,) = a.paths
    assert p.id == "nvme" and p.worker == "pc1-a" and p.capacity == 8 << 40 and p.can_seal
    assert b.resources.mem_physical == 256 << 30 and TaskType.COMMIT2 in b.task_types


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[workers]]\ncpus = 4\nmemory = "1G"', "workers\\[0\\] name: is required"),
        ('[[workers]]\nname = "x"\ncpus = 0\nmemory = "1G"', r"\(x\) cpus: must be .* 1, got 0"),
        ('[[workers]]\nname = "x"\ncpus = 4', "memory: is required"),
        ('[[workers]]\nname = "x"\ncpus = 4\nmemory = "lots"', "expected a size like 512GiB"),
        ('[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"\ntasks = ["PC9"]', "unknown task type"),
        ('[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"\nbandwidth = "fast"', "bandwidth like"),
        ('[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"\ncolour = "red"', "unknown key"),
        (
            '[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"\n'
            'resources = { PC1_32G_MAX_CONCURRENT = "four" }',
            "resources: PC1_32G_MAX_CONCURRENT='four'",
        ),
        (
            '[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"\n'
            '[[workers]]\nname = "x"\ncpus = 4\nmemory = "1G"',
            r"duplicate worker name\(s\) \['x'\]",
        ),
        ("workers = 3", "must be an array of tables"),
        ("[[workers]\n", "not valid TOML"),
    ],
)
def test_every_mistake_is_named(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(WorkerConfigError, match=message) as info:
        load_workers(cfg)
    assert str(cfg) in str(info.value)


def test_missing_file_and_units() -> None:
    with pytest.raises(WorkerConfigError, match="no such config file"):
        load_workers("definitely/not/here.toml")
    assert parse_size("1.5GiB", "x") == 3 << 29
    assert parse_size("2K", "x") == 2048
    assert parse_rate("400MB/s", "x") == 400e6 and parse_rate("10Gbit", "x") == 1.25e9
    with pytest.raises(WorkerConfigError, match="bandwidth like"):
        parse_rate(0, "x")
    with pytest.raises(WorkerConfigError, match="cannot be negative"):
        parse_size(-1, "x")
