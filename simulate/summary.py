"""The `sectors simulate` summary (`summary.json`): everything a report needs, and nothing that
changes between two runs of one seed (no wall times, no temporary paths).

Schema (times are simulated seconds or hours from the start of the run; rates per day)::

    {
      "schema": 1,
      "config": {"source": str, "sector_size": int, "chain": str, "days": float, "seed": int,
                 "sample_hours": float, "pledge": {"mode", "per_day", "every_hours",
                 "deals_per_day"}, "faults": {"worker_mtbf_hours", "worker_repair_hours",
                 "message_failure_rate"}, "assigners": [str], "variants": [str]},
      "runs": [                        # one per (variant, assigner), baseline first
        {
          "variant": "baseline" | "add-worker NAME" | "policy NAME Key=Value",
          "assigner": "balanced" | "lotus",
          "warmup_hours": float,       # fill-up time excluded from the steady figures
          "sectors": {
            "pledged": int, "refused": int,   # pledges made / refused (MaxSealingSectors)
            "started": int,                   # sectors started (the plan's, auto-pledge's)
            "proving_total": int,             # sectors that reached Proving in the run
            "proving_per_day": [int],         # per simulated day
            "steady_per_day": float | null,   # rate between the first and the last sector to
                                              # reach Proving after the warm-up (null: < 2)
            "steady_window_hours": float
          },
          "bound": {
            "per_day": float,                 # the least stage capacity
            "ratio": float | null,            # steady_per_day / per_day
            "limiting": [str],                # the stages at the bound (task short names)
            "shared": [str],                  # workers whose limiting slots leave no room
                                              # for their other stages: the bound may be loose
            "resources": [{"worker": str, "resource": "GPU" | "CPU threads" | "memory",
                           "per_day": float, "stages": [str]}],  # shared by stages only that
                                              # worker runs (simulate/sharing.py)
            "limiting_resource": {"worker": str, "resource": str} | null,  # below every stage
            "stages": {TASK: {"per_day": float | null,       # null: unlimited
                              "workers": {WORKER: {"slots": int | null, "seconds": float,
                                                   "fetch_seconds": float,
                                                   "per_day": float | null,
                                                   "link_bound": bool}}}}
          },
          "bottleneck": {"text": str, "stages": [str],
                         TASK: {"worker": str, "busy": float, "gain_per_day": float}},
          "utilisation": {                    # per worker, per stage: slot time / slots
            "sample_hours": float,
            "workers": {WORKER: {TASK: {"slots": int | null, "tasks": int,
                                        "steady": float | null,   # fraction over the window
                                        "series": [float]}}}      # per sample (mean tasks
          },                                                      # held if slots is null)
          "queue_wait": {TASK: {"count": int, "p50_s": float, "p95_s": float, "mean_s": float}},
          "fetch": {"pairs": [{"from": str, "to": str, "bytes": int}], "total_bytes": int,
                    "seconds": {WORKER: {TASK: float}}},
          "disk": {"sample_hours": float,     # bytes stored or reserved per path
                   "paths": {PATH: {"capacity": int, "peak": int,
                                    "full_from_hour": float | null,  # first sample >= 98%
                                    "series": [int]}}},
          "states": {"sample_hours": float, "series": {STATE: [int]}},
          "failures": {"by_state": {STATE: int}, "retries_by_state": {STATE: int},
                       "worker_crashes": {WORKER: int}, "worker_down_hours": {WORKER: float},
                       "failed_messages": {METHOD: int}, "missed_changes": int}
        }
      ],
      "comparison": [                  # each what-if against the baseline, per assigner
        {"variant": str, "assigner": str, "steady_per_day": float | null,
         "baseline_per_day": float | null, "delta_per_day": float | null,
         "bound_per_day": float, "baseline_bound_per_day": float}
      ]
    }
"""

from __future__ import annotations

from typing import Any

from ..sched import TaskType
from .bound import STAGES, bottleneck_sentence
from .collect import percentile
from .config import SimulateConfig
from .run import RunResult

__all__ = ["SCHEMA", "run_summary", "steady_rate", "summary"]

SCHEMA = 1
#: A path this full takes no new sector: sealing stalls there.
FULL = 0.98


def steady_rate(proving: list[float], start: float, end: float) -> tuple[float | None, float]:
    """Sectors per day between the first and last to reach Proving in [start, end], and hours.

    Counting the sectors after the first one over the time between them measures the rate of
    a pipeline that finishes sectors in bursts (slots that started together) without the
    error of a window edge cutting a burst.
    """
    inside = [t for t in proving if start <= t <= end]
    if len(inside) < 2 or inside[-1] <= inside[0]:
        return None, 0.0
    first, last = inside[0], inside[-1]
    after = sum(1 for t in inside if t > first)
    return after / (last - first) * 86400, (last - first) / 3600


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def run_summary(r: RunResult) -> dict[str, Any]:
    """One run's JSON object (see the module docstring)."""
    c = r.collector
    end = r.days * 86400
    steady, window_h = steady_rate(c.proving, r.warmup, end)
    days = max(1, round(r.days + 0.4999))
    per_day = [0] * days
    for t in c.proving:
        per_day[min(days - 1, int(t // 86400))] += 1
    b = r.bound
    slots = {(w.worker, t): w.slots for t, s in b.stages.items() for w in s.workers}
    steady_busy: dict[tuple[str, TaskType], float] = {}
    util: dict[str, dict[str, Any]] = {}
    n = c.samples - 1
    for w in r.variant.workers:
        per_task: dict[str, Any] = {}
        for task in STAGES:
            key = (w.name, task)
            if key not in slots:
                continue
            n_slots = slots[key]
            buckets = c.busy.get(key, {})
            div = c.sample * (n_slots or 1)
            series = [round(buckets.get(i, 0.0) / div, 3) for i in range(n)]
            held = c.busy_between(key, r.warmup, end)
            first, last = -(-r.warmup // c.sample), end // c.sample
            span = max(0.0, (last - first) * c.sample)
            frac = held / (span * n_slots) if n_slots and span else None
            if frac is not None:
                steady_busy[key] = frac
            per_task[task.short] = {
                "slots": n_slots,
                "tasks": c.tasks_done.get(key, 0),
                "steady": _r(frac),
                "series": series,
            }
        util[w.name] = per_task
    text, figures = bottleneck_sentence(b, steady_busy)
    offered = c.started / r.days if r.days else 0.0
    if c.started and offered < b.per_day * 0.97:
        # Fewer sectors came in than the cluster can seal: demand, not a stage, sets the rate.
        text += f"; but only {offered:.1f} sectors/day came in: the pledge plan limits first"
    waits = {
        t.short: {
            "count": len(v),
            "p50_s": round(percentile(v, 50), 1),
            "p95_s": round(percentile(v, 95), 1),
            "mean_s": round(sum(v) / len(v), 1) if v else 0.0,
        }
        for t in STAGES
        if (v := c.waits.get(t)) is not None
    }
    pairs = [
        {"from": src, "to": dst, "bytes": nbytes}
        for (src, dst), nbytes in sorted(r.fetched.items())
    ]
    fetch_s: dict[str, dict[str, float]] = {}
    for (worker, task), s in sorted(c.fetch_seconds.items()):
        if s:
            fetch_s.setdefault(worker, {})[task.short] = round(s, 1)
    capacity = {p.id: p.capacity for w in r.variant.workers for p in w.paths}
    full_from: dict[str, float | None] = {}
    for pid, used_series in c.disk.items():
        cap = capacity.get(pid, 0)
        at = next((i for i, used in enumerate(used_series) if cap and used >= cap * FULL), None)
        full_from[pid] = None if at is None else round(at * c.sample / 3600, 3)
    full = [f"{pid} from hour {h:g}" for pid, h in sorted(full_from.items()) if h is not None]
    if full:
        # Sealed sectors that stay on sealing paths fill them; nothing is sealed there after.
        text += f"; disk full: {', '.join(full)} (sealing stalls there)"
    return {
        "variant": r.variant.label,
        "assigner": r.assigner,
        "warmup_hours": round(r.warmup / 3600, 3),
        "sectors": {
            "pledged": r.pledged,
            "refused": r.refused,
            "started": c.started,
            "proving_total": len(c.proving),
            "proving_per_day": per_day,
            "steady_per_day": _r(steady),
            "steady_window_hours": round(window_h, 3),
        },
        "bound": {
            "per_day": round(b.per_day, 3),
            "ratio": _r(steady / b.per_day) if steady is not None and b.per_day else None,
            "limiting": [t.short for t in b.limiting],
            "shared": list(b.shared),
            "resources": [
                {
                    "worker": x.worker,
                    "resource": x.resource,
                    "per_day": round(x.per_day, 3),
                    "stages": [t.short for t in x.stages],
                }
                for x in b.resources
            ],
            "limiting_resource": (
                None
                if b.limiting_resource is None
                else {
                    "worker": b.limiting_resource.worker,
                    "resource": b.limiting_resource.resource,
                }
            ),
            "stages": {
                t.short: {
                    "per_day": _r(s.per_day),
                    "workers": {
                        w.worker: {
                            "slots": w.slots,
                            "seconds": round(w.seconds, 3),
                            "fetch_seconds": round(w.fetch_seconds, 3),
                            "per_day": _r(w.per_day),
                            "link_bound": w.link_bound,
                        }
                        for w in s.workers
                    },
                }
                for t, s in b.stages.items()
            },
        },
        "bottleneck": {"text": text, **figures},
        "utilisation": {"sample_hours": c.sample / 3600, "workers": util},
        "queue_wait": waits,
        "fetch": {
            "pairs": pairs,
            "total_bytes": sum(r.fetched.values()),
            "seconds": fetch_s,
        },
        "disk": {
            "sample_hours": c.sample / 3600,
            "paths": {
                pid: {
                    "capacity": capacity.get(pid, 0),
                    "peak": max(s, default=0),
                    "full_from_hour": full_from.get(pid),
                    "series": s,
                }
                for pid, s in sorted(c.disk.items())
            },
        },
        "states": {"sample_hours": c.sample / 3600, "series": dict(sorted(c.states.items()))},
        "failures": {
            "by_state": dict(sorted(c.failures.items())),
            "retries_by_state": dict(sorted(c.retries.items())),
            "worker_crashes": dict(sorted(r.faults.crashes.items())),
            "worker_down_hours": dict(sorted(r.faults.down_hours.items())),
            "failed_messages": dict(sorted(r.faults.failed_messages.items())),
            "missed_changes": c.missed,
        },
    }


def summary(
    cfg: SimulateConfig, days: float, seed: int, variants: list[str], results: list[RunResult]
) -> dict[str, Any]:
    """The whole summary: the config, each run, and each what-if against its baseline."""
    runs = [run_summary(r) for r in results]
    base = {r["assigner"]: r for r in runs if r["variant"] == "baseline"}
    comparison = []
    for r in runs:
        if r["variant"] == "baseline":
            continue
        b = base[r["assigner"]]
        mine, theirs = r["sectors"]["steady_per_day"], b["sectors"]["steady_per_day"]
        comparison.append(
            {
                "variant": r["variant"],
                "assigner": r["assigner"],
                "steady_per_day": mine,
                "baseline_per_day": theirs,
                "delta_per_day": (
                    round(mine - theirs, 3) if mine is not None and theirs is not None else None
                ),
                "bound_per_day": r["bound"]["per_day"],
                "baseline_bound_per_day": b["bound"]["per_day"],
            }
        )
    p = cfg.pledge
    f = cfg.faults
    return {
        "schema": SCHEMA,
        "config": {
            "source": cfg.source.rsplit("/", 1)[-1],
            "sector_size": cfg.sector_size,
            "chain": cfg.chain,
            "days": days,
            "seed": seed,
            "sample_hours": cfg.sample_hours,
            "pledge": {
                "mode": p.mode,
                "per_day": p.per_day,
                "every_hours": p.every_hours,
                "deals_per_day": p.deals_per_day,
            },
            "faults": {
                "worker_mtbf_hours": f.worker_mtbf_hours,
                "worker_repair_hours": f.worker_repair_hours,
                "message_failure_rate": f.message_failure_rate,
            },
            "assigners": list(cfg.assigners),
            "variants": variants,
        },
        "runs": runs,
        "comparison": comparison,
    }
