#!/usr/bin/env python
"""Benchmark of the sealing-task scheduler (`sectorfsm.sched`): decision cost and placement quality.

Run ``python bench/bench_sched.py [--quick]``. Progress goes to stderr; the last line of stdout
is one JSON object with every figure (see the "Scheduler benchmark" section of bench/README.md).

Two parts:

1. **Decision cost.** 1,000 workers full with long-running held jobs and 10,000 queued tasks
   of many shapes (PC2 on files held by 750 different workers, PC1 with an alloc selector, PC1
   next to its unsealed file, and in the `saturated` scenario C2). In the headline `backlog`
   scenario the C2 boxes are half busy and nothing queued fits anywhere. One held job at a
   time is finished, and the wall time from that event until the event loop is quiet again
   (the scheduler has reacted and the next task has started) is one *release*. Each release
   on the `balanced` scheduler assigns exactly one task; its p50 is `decision_ms`. The same
   workload runs on the `lotus` baseline in a separate process with a deadline, and
   `speedup_vs_lotus` is the ratio of the two costs per decision (time over tasks assigned).
2. **Placement quality.** Heterogeneous clusters on a virtual clock run a synthetic
   AP -> PC1 -> PC2 -> (WaitSeed) -> C1 -> C2 -> FIN chain per 32 GiB sector, with file
   movement over links of a given speed. Sectors finished per day after warm-up, divided by the
   analytic upper bound (the stage with the least capacity), is the quality of an assigner.

Internal: ``--child decisions ...`` runs part 1 for one assigner and prints one JSON line per
measurement (the parent reads them with a deadline).
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from sched_cluster import START, log, lotus_available
from sched_decisions import child_main, run_decisions
from sched_quality import JITTER, SHAPES, STAGES, WAIT_SEED_S, analytic_bound, simulate

# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run, at most 5 minutes")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--skip-decisions", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-quality", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    quick = a.quick
    has_lotus = lotus_available()
    if not has_lotus:
        log("NOTE: this checkout has no `lotus` assigner; every lotus figure is null")
    result: dict[str, Any] = {"bench": "sched", "quick": quick}

    # Part 1.
    cfg: dict[str, Any] = {
        "workers": 1000,
        "queued": 10000,
        "burst": 16,
        "releases": 96 if quick else 400,
        "lotus_releases": 32 if quick else 128,
        # Per child process; quick's worst case is 2 x (45 + 75) s plus ~45 s of simulation.
        "budget_s": 45.0 if quick else 300.0,
        "lotus_budget_s": 75.0 if quick else 300.0,
        "scenarios": ["backlog", "saturated"],
    }
    result["decision_config"] = cfg
    decisions_out: dict[str, Any] = {}
    if not a.skip_decisions:
        for sc in cfg["scenarios"]:
            ours = run_decisions(
                "balanced",
                sc,
                workers=cfg["workers"],
                queued=cfg["queued"],
                releases=cfg["releases"],
                burst=cfg["burst"],
                budget_s=cfg["budget_s"],
            )
            theirs = None
            if has_lotus:
                theirs = run_decisions(
                    "lotus",
                    sc,
                    workers=cfg["workers"],
                    queued=cfg["queued"],
                    releases=cfg["lotus_releases"],
                    burst=cfg["burst"],
                    budget_s=cfg["lotus_budget_s"],
                )
            decisions_out[sc] = _decision_figures(ours, theirs)
    result["decisions"] = decisions_out
    head = decisions_out.get("backlog", {})
    for key in (
        "decision_ms",
        "decision_p95_ms",
        "decision_cycle_ms",
        "decision_cost_ms",
        "checks_per_decision",
        "speedup_vs_lotus",
        "lotus_decision_cost_ms",
    ):
        result[key] = head.get(key)
    if "saturated" in decisions_out:
        result["speedup_vs_lotus_saturated"] = decisions_out["saturated"].get("speedup_vs_lotus")
        result["decision_ms_saturated"] = decisions_out["saturated"].get("decision_ms")

    # Part 2.
    days, warm = (2.5, 1.0) if quick else (5.0, 1.0)
    result["quality_config"] = {
        "days": days,
        "warmup_days": warm,
        "stage_minutes": {s.name: s.seconds / 60 for s in STAGES},
        "jitter": JITTER,
        "wait_seed_minutes": WAIT_SEED_S / 60,
    }
    shapes: dict[str, Any] = {}
    if not a.skip_quality:
        for shape in SHAPES:
            bound = analytic_bound(shape)
            log(
                f"quality[{shape.name}]: bound {bound['bound_per_day']:.1f}/day at "
                f"{bound['bottleneck']}; stages {bound['stage_per_day']}; slots {bound['slots']}"
            )
            entry: dict[str, Any] = {"description": shape.description, **bound}
            entry["bound_per_day"] = round(bound["bound_per_day"], 1)
            entry["workers"] = {k.name: k.count for k in shape.kinds}
            entry["balanced"] = simulate(shape, "balanced", days, warm, a.seed)
            entry["lotus"] = simulate(shape, "lotus", days, warm, a.seed) if has_lotus else None
            if shape.pinned_control:
                # Control: the same cluster with PC2 bound to the PC1 box (no fetch). If this
                # reaches the bound, the loss above is placement, not the cluster or the bench.
                entry["balanced_pc2_pinned"] = simulate(
                    shape, "balanced", days, warm, a.seed, pc2_fetch=False
                )
                entry["lotus_pc2_pinned"] = (
                    simulate(shape, "lotus", days, warm, a.seed, pc2_fetch=False)
                    if has_lotus
                    else None
                )
            shapes[shape.name] = entry
    result["shapes"] = shapes
    if shapes:
        result["quality_balanced"] = min(e["balanced"]["quality"] for e in shapes.values())
        result["quality_lotus"] = (
            min(e["lotus"]["quality"] for e in shapes.values()) if has_lotus else None
        )
        for name, e in shapes.items():
            result[f"quality_balanced_{name}"] = e["balanced"]["quality"]
            result[f"quality_lotus_{name}"] = e["lotus"]["quality"] if e["lotus"] else None
            if "balanced_pc2_pinned" in e:
                result[f"quality_balanced_{name}_pc2_pinned"] = e["balanced_pc2_pinned"]["quality"]
                pinned = e["lotus_pc2_pinned"]
                result[f"quality_lotus_{name}_pc2_pinned"] = pinned["quality"] if pinned else None
    result["python"] = platform.python_version()
    result["cpus"] = os.cpu_count()
    result["wall_s"] = round(time.perf_counter() - START, 1)
    line = json.dumps(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")
    print(line)


def _decision_figures(ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON figures of one scenario: ours, the baseline's, and the ratio."""
    mine = ours.get("cost_per_decision_ms")
    t = theirs or {}
    speedup: float | None = None
    if mine and t.get("cost_per_decision_ms"):
        speedup = t["cost_per_decision_ms"] / mine
    elif theirs is not None:
        log("NOTE: the lotus run assigned nothing within its budget: speedup_vs_lotus is null")
    return {
        "decision_ms": _round(ours.get("release_p50_ms")),
        "decision_p95_ms": _round(ours.get("release_p95_ms")),
        "decision_cycle_ms": _round(ours.get("cycle_p50_ms")),
        "decision_cost_ms": _round(mine),
        "checks_per_decision": _round(ours.get("checks_per_decision"), 1),
        "assignments_per_release": _round(ours.get("assigned_per_release")),
        "files_changed_ms": _round(ours.get("files_changed_ms")),
        "setup": ours.get("setup"),
        "speedup_vs_lotus": _round(speedup, 1),
        "lotus_decision_cost_ms": _round(t.get("cost_per_decision_ms")),
        "lotus_release_p50_ms": _round(t.get("release_p50_ms")),
        "lotus_release_p95_ms": _round(t.get("release_p95_ms")),
        "lotus_cycle_p50_ms": _round(t.get("cycle_p50_ms")),
        "lotus_checks_per_decision": _round(t.get("checks_per_decision"), 1),
        "lotus_decisions": t.get("assigned"),
        "lotus_releases": t.get("releases"),
        "lotus_complete": t.get("complete"),
        "lotus_setup": t.get("setup"),
    }


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


if __name__ == "__main__":
    main()
