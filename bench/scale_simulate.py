#!/usr/bin/env python
"""`sectors simulate` speed: 30 simulated days of a 100-worker cluster, one assigner, no report.

Run ``python bench/scale_simulate.py`` (bench/cluster-100w.toml, 30 days, `balanced`), or
``python bench/bench_scale.py --simulate`` which calls it. ``--days``, ``--config`` and
``--assigner`` change the run; ``--profile FILE`` writes a cProfile dump and prints the top
functions to stderr. The last line of stdout is one JSON object: `simulate_30d_100w_s` (wall
seconds of the run, the figure of issue 17) beside the sectors sealed, sectors per day in
steady state, the bound and the ratio to it (bench/README.md, "Simulate").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "cluster-100w.toml"


def measure(config: Path, days: float, assigner: str, seed: int) -> dict[str, Any]:
    """Run one simulation of `config` and return its figures (wall and CPU time included)."""
    from sectorfsm.simulate.config import load_simulate_config
    from sectorfsm.simulate.run import Variant, run_once
    from sectorfsm.simulate.summary import run_summary

    cfg = load_simulate_config(config)
    t0, c0 = time.perf_counter(), time.process_time()
    last = [t0]

    def progress(t: float) -> None:
        now = time.perf_counter()
        if now - last[0] >= 10 or t >= days * 86400:
            last[0] = now
            print(f"  day {t / 86400:5.2f}: {now - t0:6.1f} s wall", file=sys.stderr, flush=True)

    result = asyncio.run(
        run_once(cfg, Variant("baseline", tuple(cfg.workers)), assigner, days, seed, progress)
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = run_summary(result)
    sealed = len(result.collector.proving)
    return {
        "config": config.name,
        "workers": len(cfg.workers),
        "days": days,
        "assigner": assigner,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "sectors_sealed": sealed,
        "sectors_started": result.collector.started,
        "per_day": round(sealed / days, 1),
        "steady_per_day": s["sectors"]["steady_per_day"],
        "bound_per_day": s["bound"]["per_day"],
        "ratio": s["bound"]["ratio"],
        "wall_ms_per_sector": round(wall / max(1, sealed) * 1000, 2),
        "cpu_ms_per_sector": round(cpu / max(1, sealed) * 1000, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its JSON line, and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--assigner", default="balanced", choices=("balanced", "lotus"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--profile", help="write a cProfile dump here (top 30 to stderr)")
    args = ap.parse_args(argv)
    print(f"simulate {args.config.name}, {args.days:g} days ...", file=sys.stderr, flush=True)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        fig = prof.runcall(measure, args.config, args.days, args.assigner, args.seed)
        prof.dump_stats(args.profile)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    else:
        fig = measure(args.config, args.days, args.assigner, args.seed)
    out = {f"simulate_{args.days:g}d_{fig['workers']}w_s": fig["wall_s"], **fig}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
