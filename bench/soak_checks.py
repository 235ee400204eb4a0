"""The soak's invariants, as functions of what the store, the disk and the logs hold.

Each returns the broken invariants as one-line messages (bench/soak.py reports each once).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: States that need no reason: where a sector ends up when all went well or was asked for.
DONE = frozenset({"Proving", "Removed"})
FILE_KINDS = ("unsealed", "sealed", "cache")


@dataclass(slots=True)
class Ledger:
    """What the CLI acknowledged, to hold the store to."""

    #: Pledged sector number -> how many `Created CC sector: N` lines named it.
    confirmed: Counter[int] = field(default_factory=Counter)
    #: Sectors of pledges queued durably without a number yet (no engine answered).
    queued_pledges: int = 0
    #: Sectors of pledges whose command failed: they may or may not exist.
    unsure_pledges: int = 0
    piece_acks: Counter[str] = field(default_factory=Counter)
    piece_unsure: Counter[str] = field(default_factory=Counter)


def read_sectors(repo: Path) -> dict[int, Any]:
    """Every sector record of `repo`, as the CLI reads them (raises if one is unreadable)."""
    from sectorfsm.fsm import LmdbStore
    from sectorfsm.sealing.store_view import sector_records, store_path

    with LmdbStore(store_path(repo)) as store:
        return {int(n): info for n, info in sector_records(store, events=False).list()}


def store_violations(infos: dict[int, Any], led: Ledger, final: bool) -> list[str]:
    """Acknowledged pledges and pieces: none lost, none applied twice, no piece in CC."""
    out = []
    for n, times in sorted(led.confirmed.items()):
        if times > 1:
            out.append(f"sector number {n} was confirmed to {times} different pledges")
        if n not in infos:
            out.append(f"confirmed pledge of sector {n} is not in the store")
    cids: Counter[str] = Counter()
    cc = 0
    for n, info in sorted(infos.items()):
        held = [p.piece_cid for p in info.pieces if p.deal]
        held += [p.piece_cid for p in info.pending_pieces] + dropped_pieces(info)
        cids.update(held)
        is_cc = bool(info.log) and info.log[0].kind == "event;SectorStartCC"
        cc += is_cc
        if is_cc and held:
            out.append(f"deal piece(s) {held} were routed into CC sector {n}")
    for cid, count in sorted(cids.items()):
        most = led.piece_acks[cid] + led.piece_unsure[cid]
        if count > most:
            out.append(f"piece {cid} is in sectors {count} times, acknowledged {most}")
    if not final:
        return out
    for cid, acks in sorted(led.piece_acks.items()):
        if cids[cid] < acks:
            out.append(f"piece {cid} acknowledged {acks} times, in sectors {cids[cid]} times")
    least = len(led.confirmed) + led.queued_pledges
    if not least <= cc <= least + led.unsure_pledges:
        out.append(f"{cc} CC sectors for {least} acknowledged pledges")
    for n, info in sorted(infos.items()):
        state = info.state.value or "UndefinedSectorState"
        if state not in DONE and not info.last_err:
            out.append(f"sector {n} ended in {state} with no error saying why")
    return out


def dropped_pieces(info: Any) -> list[str]:
    """Pieces a sector's log says it dropped (a failed AddPiece names them): not lost."""
    out = []
    for entry in info.log:
        if entry.kind == "event;SectorAddPieceFailed":
            try:
                dropped = json.loads(entry.message)["User"]["dropped"]
            except (ValueError, KeyError, TypeError):
                continue
            out += [p["piece_cid"] for p in dropped]
    return out


def exec_violations(log: Path) -> tuple[int, list[str]]:
    """`(executions, messages)`: a task run twice in one engine run on one attempt."""
    if not log.exists():
        return 0, []
    runs = [json.loads(line) for line in log.read_text().splitlines() if line]
    seen: Counter[tuple[Any, ...]] = Counter()
    for r in runs:
        seen[(r["inc"], r["sector"], r["task"], r["state"], r["gen"], r["where"])] += 1
    out = []
    for (inc, n, task, state, gen, _), count in seen.items():
        if count > 1:
            out.append(
                f"{task} ran {count} times for sector {n} in {state} in engine run {inc} "
                f"with no new event applied in between (attempt {gen})"
            )
    return len(runs), out


def storage_counted(repo: Path) -> dict[int, int]:
    """Bytes per sector in the persisted storage index (`sectorfiles`)."""
    from sectorfsm.fsm import LmdbStore
    from sectorfsm.fsm.codec import unpackb
    from sectorfsm.sealing.sealer import FILES_DB
    from sectorfsm.sealing.store_view import store_path

    counted = {}
    with LmdbStore(store_path(repo)) as store:
        db = store.db(FILES_DB)
        with store.read() as txn:
            for key, raw in txn.cursor(db=db):
                counted[int(key)] = sum(int(v[1]) for v in unpackb(raw).values())
    return counted


def storage_on_disk(storage: Path, miner: int) -> dict[int, int]:
    """Apparent bytes per sector of the files under a storage path (Lotus's layout)."""
    disk: Counter[int] = Counter()
    for kind in FILE_KINDS:
        for entry in (storage / kind).glob(f"s-t0{miner}-*"):
            files = [p for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else [entry]
            disk[int(entry.name.rsplit("-", 1)[1])] += sum(p.stat().st_size for p in files)
    return dict(disk)


def storage_violations(
    counted: dict[int, int], disk: dict[int, int], infos: dict[int, Any]
) -> list[str]:
    """The index counts the bytes on disk of every Proving or Removed sector, and of files
    no sector record explains. Sealing sectors are left out: the index counts what their
    cache will grow to. Lotus's finalized cache size is an estimate: a quarter, or 1 KiB,
    of slack."""
    off = []
    for n in sorted(set(counted) | set(disk)):
        info = infos.get(n)
        if info is not None and info.state.value not in DONE:
            continue
        c, d = counted.get(n, 0), disk.get(n, 0)
        if abs(c - d) > max(1024, d // 4):
            off.append(f"{n}: {c} counted / {d} on disk")
    if not off:
        return []
    total = f"{sum(counted.values())} bytes counted, {sum(disk.values())} on disk"
    shown = "; ".join(off[:6]) + ("; ..." if len(off) > 6 else "")
    return [f"storage index differs from the disk for {len(off)} sector(s) ({total}): {shown}"]


def chain_epochs(repo: Path, block_time: float) -> int:
    """Devnet epochs since the chain's genesis (stored), to now."""
    from sectorfsm.fsm import LmdbStore
    from sectorfsm.fsm.codec import unpackb
    from sectorfsm.sealing.store_view import store_path

    with LmdbStore(store_path(repo)) as store:
        db = store.db("devnet")
        with store.read() as txn:
            raw = txn.get(b"params", db=db)
    if raw is None:
        return 0
    record = unpackb(raw)
    start = int(record["params"]["start_epoch"])
    return int((time.time() - record["genesis"]) / block_time) - start
