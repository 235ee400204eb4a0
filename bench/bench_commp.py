#!/usr/bin/env python
"""Benchmark of piece commitments (`sectorfsm.sealing.commp`) against raw SHA-256.

Run ``python bench/bench_commp.py [--quick]``. Progress goes to stderr; the last line of stdout
is one JSON object with every figure (see the "bench_commp.py" section of bench/README.md).

The data is random: 8 MiB from `os.urandom`, streamed over and over as one piece, each repeat
starting at a different offset of the block (so no two subtrees are alike) and handed over as
a zero-copy view. The same views are then fed to one `hashlib.sha256` object, which is the
baseline: `ratio_vs_sha256` is CommP's throughput over raw SHA-256's on the same bytes, in the
same run, as the median over rounds (each round one CommP run, then one SHA-256 run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator

from sectorfsm.sealing import commp

MiB = 1 << 20
BLOCK = 8 * MiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def views(double: memoryview, total: int) -> Iterator[memoryview]:
    """`total` bytes as views of BLOCK bytes, each at another offset of the doubled block."""
    i = 0
    while total > 0:
        start = (i * 4099) % BLOCK  # odd stride: repeats never line up with a chunk boundary
        view = double[start : start + min(BLOCK, total)]
        yield view
        total -= len(view)
        i += 1


def commp_once(double: memoryview, total: int, workers: int) -> tuple[float, str]:
    """Seconds for the CommP of the stream (worker start-up included) and its CID."""
    t0 = time.perf_counter()
    with commp.CommPHasher(workers=workers) as hasher:
        for view in views(double, total):
            hasher.update(view)
        cid = hasher.cid()
    return time.perf_counter() - t0, cid


def sha_once(double: memoryview, total: int) -> float:
    """Seconds for one sha256 over the same bytes."""
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for view in views(double, total):
        h.update(view)
    h.digest()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, 5 rounds (about 20 s)")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = ap.parse_args()

    cores = commp.default_workers()
    workers = args.workers or cores
    total = (256 if args.quick else 1024) * MiB
    rounds = 5 if args.quick else 3
    block = os.urandom(BLOCK)
    double = memoryview(block + block)
    np_used = commp.USE_NUMPY and commp.numpy_module() is not None
    log(f"commp bench: {total // MiB} MiB, {workers} worker(s), {cores} core(s), numpy={np_used}")

    par: list[float] = []
    raw: list[float] = []
    cids = set()
    for r in range(rounds):
        t, cid = commp_once(double, total, workers)
        par.append(t)
        cids.add(cid)
        raw.append(sha_once(double, total))
        log(f"round {r + 1}: commp {t:.2f} s ({workers} workers), sha256 {raw[-1]:.3f} s")
    ser, cid = commp_once(double, total, 1)
    cids.add(cid)
    log(f"serial commp (in-process): {ser:.2f} s")
    if len(cids) != 1:
        raise SystemExit(f"CommP differs between runs: {cids}")

    mb = total / 1e6
    commp_s, raw_s = statistics.median(par), statistics.median(raw)
    result = {
        "bench": "commp",
        "quick": args.quick,
        "data_bytes": total,
        "piece_padded_size": commp.padded_size(commp.fit_unpadded(total)),
        "piece_cid": cids.pop(),
        "cores": cores,
        "workers": workers,
        "numpy": np_used,
        "commp_s": round(commp_s, 3),
        "raw_sha256_s": round(raw_s, 3),
        "commp_mb_s": round(mb / commp_s, 1),
        "raw_sha256_mb_s": round(mb / raw_s, 1),
        "ratio_vs_sha256": round(raw_s / commp_s, 4),
        "ratio_runs": [round(b / a, 4) for a, b in zip(par, raw, strict=True)],
        "commp_serial_mb_s": round(mb / ser, 1),
        "ratio_serial_vs_sha256": round(raw_s / ser, 4),
        "python": platform.python_version(),
    }
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
