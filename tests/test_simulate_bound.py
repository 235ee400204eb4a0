"""`sectors simulate` checked against hand arithmetic: small clusters whose rate is known.

Each cluster seals 32 GiB sectors on the mainnet chain (30 s epochs) for a few simulated days,
with batching off so sectors reach Proving as they are sealed. The steady rate is measured
after the warm-up (the pipeline's fill-up time is excluded, see `summary.steady_rate`) and
must be within 3% of the bound worked out here by hand; the report must name the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sectorfsm.sched import TaskType
from sectorfsm.simulate import load_simulate_config, parse_what_if, run_all, summary
from sectorfsm.simulate.summary import steady_rate

HEAD = """
[sealing]
batch_pre_commits = false
aggregate_commits = false

[simulate]
assigners = ["balanced"]
[simulate.pledge]
mode = "rate"
per_day = {per_day}
"""

BOX = """
[[workers]]
name = "{name}"
cpus = 64
memory = "1TiB"
gpus = ["g"]
tasks = {tasks}
{extra}
resources = {{ {resources} }}
[[workers.paths]]
id = "{name}-nvme"
capacity = "1PiB"
store = true
"""

ALL = '["AP", "PC1", "PC2", "C1", "C2", "FIN"]'
DAY = 86400


def _box(name: str, tasks: str = ALL, resources: str = "", extra: str = "") -> str:
    return BOX.format(name=name, tasks=tasks, resources=resources, extra=extra)


def _simulate(
    tmp_path: Path, text: str, days: float, what_ifs: tuple[str, ...] = ()
) -> dict[str, Any]:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    cfg = load_simulate_config(path)
    wis = [parse_what_if(w, cfg) for w in what_ifs]
    results = run_all(cfg, wis, days, seed=1)
    return summary(cfg, days, 1, [w.label for w in wis], results)


def _close(run: dict[str, Any], expected: float) -> None:
    assert run["bound"]["per_day"] == pytest.approx(expected, rel=1e-3)
    steady = run["sectors"]["steady_per_day"]
    assert steady is not None
    assert abs(steady / expected - 1) <= 0.03, (steady, expected)
    assert run["sectors"]["steady_window_hours"] >= 24  # measured over a day at least


def test_one_stage_clearly_the_bottleneck(tmp_path: Path) -> None:
    # 2 PC1 slots x 3.5 h: 2 / 3.5 * 24 = 13.714 sectors/day; every other stage is far faster.
    text = HEAD.format(per_day=15) + _box("box", resources="PC1_32G_MAX_CONCURRENT = 2")
    out = _simulate(tmp_path, text, days=3)
    [run] = out["runs"]
    _close(run, 2 / 3.5 * 24)
    assert run["bound"]["limiting"] == ["PC1"]
    assert run["bottleneck"]["text"].startswith("PC1 on box is the bottleneck: 100% busy")
    assert "one more PC1 slot adds ~6.9 sectors/day" in run["bottleneck"]["text"]
    pc1 = run["utilisation"]["workers"]["box"]["PC1"]
    assert pc1["slots"] == 2 and pc1["steady"] == pytest.approx(1.0, abs=0.02)
    assert run["failures"]["by_state"] == {}


def test_two_balanced_stages(tmp_path: Path) -> None:
    # PC1: 2 slots x 3.5 h = 13.714/day; C2 on its own box: 1 slot x 1.75 h = 13.714/day.
    text = (
        HEAD.format(per_day=15)
        + '[simulate.worker_durations.c2-box]\nC2 = "1.75h"\n'
        + _box("box", '["AP", "PC1", "PC2", "C1", "FIN"]', "PC1_32G_MAX_CONCURRENT = 2")
        + _box("c2-box", '["C2"]', "C2_32G_MAX_CONCURRENT = 1")
    )
    out = _simulate(tmp_path, text, days=3)
    [run] = out["runs"]
    _close(run, 24 / 1.75)
    assert run["bound"]["limiting"] == ["PC1", "C2"]
    text_ = run["bottleneck"]["text"]
    assert "PC1 on box" in text_ and "C2 on c2-box" in text_ and "balanced bottlenecks" in text_
    # Adding to one of two balanced stages gains nothing.
    assert "adds ~0.0 sectors/day" in text_


def test_link_bound_fetch(tmp_path: Path) -> None:
    # PC1 runs only on pc1-box, AP only on ap-box: each PC1 first fetches the 32 GiB unsealed
    # file over a 1.36 MB/s link, 7 h; the next task's fetch overlaps this one's 3.5 h of
    # work, so the fetch sets the pace: 2 slots / 7 h = 6.857/day.
    link = 32 * 2**30 / 25200
    text = (
        HEAD.format(per_day=8)
        + _box("ap-box", '["AP"]')
        + _box(
            "pc1-box",
            '["PC1", "PC2", "C1", "C2", "FIN"]',
            "PC1_32G_MAX_CONCURRENT = 2",
            extra=f"bandwidth = {link}",
        )
    )
    out = _simulate(tmp_path, text, days=4)
    [run] = out["runs"]
    _close(run, 2 / 7 * 24)
    pc1 = run["bound"]["stages"]["PC1"]["workers"]["pc1-box"]
    assert pc1["fetch_seconds"] == pytest.approx(25200, rel=1e-6)
    assert run["bottleneck"]["text"].startswith("PC1 on pc1-box is the bottleneck")
    assert "7.0 h of each task is the fetch of its input" in run["bottleneck"]["text"]
    [pair] = run["fetch"]["pairs"]
    assert (pair["from"], pair["to"]) == ("ap-box", "pc1-box")
    assert pair["bytes"] % (32 * 2**30) == 0 and pair["bytes"] >= 20 * 32 * 2**30


def test_what_if_policy_and_added_worker_change_the_bound(tmp_path: Path) -> None:
    text = HEAD.format(per_day=10) + _box("box", resources="PC1_32G_MAX_CONCURRENT = 2")
    out = _simulate(
        tmp_path, text, days=0.5, what_ifs=("policy box PreCommit1Max=1", "add-worker box")
    )
    bounds = {r["variant"]: r["bound"]["per_day"] for r in out["runs"]}
    assert bounds == pytest.approx(
        {"baseline": 13.714, "policy box PreCommit1Max=1": 6.857, "add-worker box": 27.429},
        rel=1e-3,
    )
    added = next(r for r in out["runs"] if r["variant"] == "add-worker box")
    assert "box-2" in added["utilisation"]["workers"]
    assert [c["variant"] for c in out["comparison"]] == [
        "policy box PreCommit1Max=1",
        "add-worker box",
    ]


def test_steady_rate_counts_bursts_between_the_first_and_last() -> None:
    # Two sectors every 3.5 h, the window opening mid-burst-interval: exactly 2 / 3.5 h.
    times = [t * 12600.0 for t in range(1, 20) for _ in range(2)]
    rate, hours = steady_rate(times, 20000.0, 200000.0)
    assert rate == pytest.approx(2 / 3.5 * 24)
    assert hours == pytest.approx((15 - 2) * 3.5)
    assert steady_rate([5.0], 0.0, 10.0) == (None, 0.0)


def test_sim_backend_runs_a_worker_at_its_own_durations() -> None:
    from sectorfsm.fsm import VirtualClock
    from sectorfsm.sealing.backends.sim import DURATIONS_32G, SimBackend

    sim = SimBackend(VirtualClock(), 1000, durations={"fast": {TaskType.PRE_COMMIT1: 3600.0}})
    size = 32 << 30
    assert sim.duration(TaskType.PRE_COMMIT1, size, "fast") == 3600.0
    assert sim.duration(TaskType.PRE_COMMIT1, size, "other") == DURATIONS_32G[TaskType.PRE_COMMIT1]
    assert sim.duration(TaskType.PRE_COMMIT1, size // 2, "fast") == 1800.0


def test_stages_taking_turns_on_one_gpu(tmp_path: Path) -> None:
    # Per stage, PC1 (2 x 3.5 h) and C2 (1 x 1.75 h) both allow 13.714/day, but the box's one
    # GPU serves PC2 (25 min) and C2 (105 min) in turn: 24 * 60 / 130 = 11.077 sectors/day.
    text = (
        HEAD.format(per_day=15)
        + '[simulate.worker_durations.box]\nC2 = "1.75h"\n'
        + _box("box", resources="PC1_32G_MAX_CONCURRENT = 2, C2_32G_MAX_CONCURRENT = 1")
    )
    out = _simulate(tmp_path, text, days=3)
    [run] = out["runs"]
    _close(run, 24 * 60 / 130)
    assert run["bound"]["limiting"] == []
    assert run["bound"]["limiting_resource"] == {"worker": "box", "resource": "GPU"}
    assert run["bottleneck"]["text"].startswith(
        "the GPU of box is the bottleneck (PC2 and C2 take turns on it)"
    )
    assert "one more GPU there adds ~2.6 sectors/day" in run["bottleneck"]["text"]


def test_a_box_whose_limiting_slots_crowd_out_its_other_stages_is_a_loose_bound() -> None:
    from sectorfsm.sched import StoragePath, WorkerResources, WorkerSpec
    from sectorfsm.simulate.bound import bound

    # 4 GPUs: PC2 and C2 need one each; C2 limits at 4 slots, and with its 4 GPUs held no PC2
    # can run: PC2 and C2 then share the GPUs, which the per-stage bound cannot see.
    size = 32 << 30
    box = WorkerSpec(
        "box",
        WorkerResources(cpus=128, mem_physical=4 << 40, mem_swap=0, gpus=("a", "b", "c", "d")),
        paths=(StoragePath("p", "box", 1 << 50),),
        needs_heartbeats=False,
    )
    other = WorkerSpec(
        "pc1",
        WorkerResources(cpus=128, mem_physical=4 << 40, mem_swap=0),
        task_types=frozenset({TaskType.ADD_PIECE, TaskType.PRE_COMMIT1, TaskType.PRE_COMMIT2}),
        paths=(StoragePath("q", "pc1", 1 << 50),),
        needs_heartbeats=False,
    )
    seconds = {w: {t: 60.0 for t in TaskType} | {TaskType.COMMIT2: 7200.0} for w in ("box", "pc1")}
    b = bound([box, other], size, seconds, {})
    assert b.limiting == (TaskType.COMMIT2,)
    assert b.limiting_resource is None  # PC2 also runs on pc1: its load could move there
    assert b.shared == ("box",)


@pytest.mark.parametrize(
    ("plan", "policy"),
    [
        ('mode = "auto"', True),  # AutoPledgeDiff in the worker's policy keeps PC1 fed
        ('mode = "fill"\nevery_hours = 12', False),
        ('mode = "deals"\ndeals_per_day = 12', False),
    ],
)
def test_every_pledge_plan_brings_sectors_to_proving(
    tmp_path: Path, plan: str, policy: bool
) -> None:
    extra = ""
    if policy:
        (tmp_path / "box.json").write_text(
            '{"AddPieceMax": 2, "PreCommit1Max": 2, "PreCommit2Max": 1, "Commit2Max": 1, '
            '"AutoPledgeDiff": 1, "AllowP2C2Parallel": true}'
        )
        extra = 'policy = "box.json"'
    text = HEAD.replace('mode = "rate"\nper_day = {per_day}', plan) + _box(
        "box", resources="PC1_32G_MAX_CONCURRENT = 2", extra=extra
    )
    out = _simulate(tmp_path, text, days=1.5)
    [run] = out["runs"]
    assert run["sectors"]["started"] >= 10
    assert run["sectors"]["proving_total"] >= 5
    if policy:
        assert run["sectors"]["pledged"] == 0  # every sector came from auto-pledge


def test_each_run_starts_on_empty_disks(tmp_path: Path) -> None:
    # The storage index counts bytes on the StoragePath objects it is given: a second run
    # (another assigner, a what-if) must not start with the files the first one left.
    text = HEAD.format(per_day=15).replace('["balanced"]', '["balanced", "lotus"]') + _box(
        "box", resources="PC1_32G_MAX_CONCURRENT = 2"
    )
    out = _simulate(tmp_path, text, days=1, what_ifs=("policy box PreCommit2Max=null",))
    assert len(out["runs"]) == 4
    for run in out["runs"]:
        series = run["disk"]["paths"]["box-nvme"]["series"]
        assert series[0] == 0 and max(series) > 0, run["variant"]
    first, *rest = out["runs"]
    # The what-if changes nothing here (no policy file means no PC2 cap): same figures.
    same = next(r for r in rest if r["assigner"] == "balanced")
    assert same["sectors"] == first["sectors"]


def test_alike_workers_get_the_same_slots_and_different_ones_their_own() -> None:
    """Workers are counted once per kind: a worker differing in resources or overrides is not
    given another kind's count."""
    from sectorfsm.sched import WorkerPolicy, WorkerResources, WorkerSpec
    from sectorfsm.sched.resources import parse_overrides
    from sectorfsm.simulate.bound import max_slots

    size, pc1 = 32 << 30, TaskType.PRE_COMMIT1
    res = WorkerResources(cpus=64, mem_physical=1 << 40, mem_swap=0)

    def slots(spec: WorkerSpec, policy: WorkerPolicy | None = None) -> int:
        return max_slots(spec, pc1, size, policy or WorkerPolicy())

    alike = [WorkerSpec(f"pc1-{i}", res) for i in range(4)]
    assert {slots(s) for s in alike} == {slots(WorkerSpec("x", res))}
    free = slots(alike[0])
    assert free > 3
    capped = WorkerSpec("c", res, overrides=parse_overrides({"PC1_32G_MAX_CONCURRENT": 3}))
    assert slots(capped) == 3
    small = WorkerSpec("s", WorkerResources(cpus=64, mem_physical=130 << 30, mem_swap=0))
    assert 0 < slots(small) < free
    assert slots(alike[1], WorkerPolicy(pre_commit1_max=2)) == 2
    assert slots(alike[2]) == free
