"""`sectors status N` latency on a small and on a large store (target: under 300 ms).

Builds two repos (10 sectors and `--sectors` sectors, default 200,000; written straight into
the store, as the engine writes them), then times `sectors status N` as a real subprocess,
median of `--runs`. The baseline is a bare `python -c pass` measured in the same run, so the
figures are comparable across noisy machines. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sectorfsm.fsm import LmdbStore
from sectorfsm.sealing.info import LogEntry, SectorInfo
from sectorfsm.sealing.states import SectorState
from sectorfsm.sealing.store_view import sector_records, store_path


def build(repo: Path, sectors: int) -> None:
    """Write `sectors` Proving sectors with a realistic 14-entry log."""
    with LmdbStore(store_path(repo), durability="nosync") as store:
        records = sector_records(store)
        for name in ("states", "live", "counters", "mailbox"):
            store.db(name)
        log = [LogEntry(1_600_000_000 + i, "event;SectorPacked", '{"User":{}}') for i in range(14)]
        batch = 10_000
        for start in range(1, sectors + 1, batch):

            def put(txn: object, start: int = start) -> None:
                for n in range(start, min(start + batch, sectors + 1)):
                    info = SectorInfo(
                        state=SectorState.Proving, number=n, sector_size=2048, log=log
                    )
                    key = records.key(n)
                    records.client_begin(txn, n, key, records.encode(info, True, None), True)

            store.write(put)


def timed(cmd: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall seconds of `cmd`."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20,000 sectors, 5 runs")
    ap.add_argument("--sectors", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    big, runs = (20_000, 5) if args.quick else (args.sectors, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        small_repo, big_repo = Path(tmp) / "small", Path(tmp) / "big"
        build(small_repo, 10)
        t = time.perf_counter()
        build(big_repo, big)
        build_s = time.perf_counter() - t
        env = dict(os.environ)
        base = timed([sys.executable, "-c", "pass"], env, runs)
        status = [sys.executable, "-m", "sectorfsm", "status", "7", "--repo"]
        small = timed([*status, str(small_repo)], env, runs)
        large = timed([*status, str(big_repo)], env, runs)
    print(
        f"python startup {base * 1000:.0f} ms; status: {small * 1000:.0f} ms (10 sectors), "
        f"{large * 1000:.0f} ms ({big:,} sectors, built in {build_s:.1f} s)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "sectors": big,
                "python_startup_ms": round(base * 1000, 1),
                "status_ms_small": round(small * 1000, 1),
                "status_ms_large": round(large * 1000, 1),
                "ratio_large_vs_small": round(large / small, 3),
                "ratio_vs_python_startup": round(large / base, 2),
                "target_ms": 300,
            }
        )
    )


if __name__ == "__main__":
    main()
