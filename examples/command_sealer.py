#!/usr/bin/env python3
"""A sealer for the `command` backend, built on the `reference` functions (NOT a real PoRep).

Configure it for every task, e.g. `{"commands": {t: ["/path/to/command_sealer.py"] for t in
("AP", "PC1", "PC2", "C1", "C2", "FIN")}}`; it reads the task from SECTORFSM_TASK, its inputs
from the environment and a JSON object on stdin, and prints a JSON result on stdout
(examples/README.md and `sectorfsm.sealing.backends.command` describe the contract).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sectorfsm.sealing.backends import files, reference


def run(task: str, env: dict[str, str], req: dict[str, Any]) -> dict[str, Any]:
    """Do one task; returns what to print."""
    miner, number = int(env["SECTORFSM_MINER"]), int(env["SECTORFSM_SECTOR_ID"])
    size = int(env["SECTORFSM_SECTOR_SIZE"])
    unsealed, sealed = Path(env["SECTORFSM_UNSEALED"]), Path(env["SECTORFSM_SEALED"])
    cache = Path(env["SECTORFSM_CACHE"])
    if task == "AP":
        piece = req["piece"]
        data = piece["data_path"] if piece is not None else None
        cid = reference.write_piece(unsealed, size, req["offset"], req["size"], data)
        return {"piece_cid": cid}
    if task == "PC1":
        ticket = bytes.fromhex(env["SECTORFSM_TICKET"])
        pieces = [(p["piece_cid"], p["size"]) for p in req["pieces"]]
        return {"pc1_out": reference.pre_commit1(unsealed, cache, size, ticket, pieces).hex()}
    if task == "PC2":
        out = bytes.fromhex(req["pc1_out"])
        comm_r, comm_d = reference.pre_commit2(miner, number, size, out, sealed, cache)
        return {"sealed": comm_r, "unsealed": comm_d}
    if task == "C1":
        ticket, seed = bytes.fromhex(env["SECTORFSM_TICKET"]), bytes.fromhex(env["SECTORFSM_SEED"])
        return {"c1_out": reference.commit1(sealed, size, ticket, seed).hex()}
    if task == "C2":
        return {"proof": reference.commit2(miner, number, bytes.fromhex(req["c1_out"])).hex()}
    if task == "FIN":
        reference.finalize(cache, unsealed, req["keep_unsealed"])
        return {}
    if task == "RELEASE_UNSEALED":
        files.remove_files([unsealed])
        return {}
    if task == "REMOVE":
        files.remove_files([unsealed, sealed, cache])
        return {}
    raise ValueError(f"unknown task {task!r}")


def main() -> int:
    """Entry point: exit 0 with the JSON result, or 1 with the error on stderr."""
    try:
        result = run(os.environ["SECTORFSM_TASK"], dict(os.environ), json.load(sys.stdin))
    except Exception as exc:  # the engine shows stderr in the sector's log
        print(f"command_sealer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
