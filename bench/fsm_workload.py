"""The workload of bench/bench_fsm.py, and the raw-LMDB baseline it is measured against.

A sector-like machine (`SectorState`) moved on by one event (`Advance`): `ChainWorkload` is
the engine's planner and step, `raw_lmdb_run` does only the store work of the same transitions
on a bare LMDB env, and `RestartWorkload` is the planner of the restart phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from sectorfsm.fsm import Context, Restart, Step
from sectorfsm.fsm.codec import RecordCodec
from sectorfsm.fsm.keys import id_key, seq_key

GROUP = "sectors"
STATUSES = ("Packing", "PreCommit1", "PreCommit2", "WaitSeed", "Committing", "FinalizeSector")
FINAL_STATUS = "Proving"
#: LmdbStore's schema version, the first element of every record and event it writes.
SCHEMA = 1
#: LmdbStore's default initial map size (it grows the map on demand).
MAP_SIZE = 64 << 20
#: The raw baseline cannot grow its map mid-loop, so it reserves enough up front.
RAW_MAP_SIZE = 1 << 30


# -- workload types -----------------------------------------------------------------------------


@dataclass
class SectorState:
    """Small machine state: a counter, a short string and a small list."""

    n: int = 0
    status: str = STATUSES[0]
    deals: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Advance:
    """The event every step sends: move the machine one transition on."""

    n: int


def is_final(state: SectorState) -> bool:
    """The `final=` predicate of the restart/RSS stores."""
    return state.status == FINAL_STATUS


def apply_advance(state: SectorState, event: Advance) -> None:
    """The state change of one transition (shared by the engine planner and the raw loop)."""
    state.n += 1
    state.status = STATUSES[state.n % len(STATUSES)]
    state.deals = [*state.deals[-2:], event.n]


class ChainWorkload:
    """Planner + step: each machine sends itself `Advance` until it made `k` transitions."""

    def __init__(self, k: int, plain_steps: bool = False) -> None:
        self.k = k
        self.applied = 0
        self.next: Step = self.plain_step if plain_steps else self.step

    async def step(self, ctx: Context, state: SectorState) -> None:
        ctx.send(Advance(state.n + 1))

    def plain_step(self, ctx: Context, state: SectorState) -> None:
        """The same step as a plain function: the engine runs it inline, without a Task."""
        ctx.send(Advance(state.n + 1))

    def planner(self, events: list[Any], state: SectorState) -> tuple[Step | None, int]:
        for event in events:
            if isinstance(event, Advance):
                apply_advance(state, event)
                self.applied += 1
        return (self.next if state.n < self.k else None), len(events)


class RestartWorkload:
    """Planner of the restart child: `Restart` re-runs the (empty) step, state unchanged.

    Leaving the state unchanged means a restart writes nothing, so repeated runs see the
    very same store.
    """

    def __init__(self) -> None:
        self.replanned = 0

    async def step(self, ctx: Context, state: SectorState) -> None:
        return None

    def planner(self, events: list[Any], state: SectorState) -> tuple[Step | None, int]:
        for event in events:
            if isinstance(event, Restart):
                self.replanned += 1
        return self.step, len(events)


# -- the raw LMDB baseline ---------------------------------------------------------------------


def raw_lmdb_run(path: Path, machines: int, transitions: int, batch: int) -> float:
    """Transitions per second of the bare store work, `batch` transitions per fsynced commit."""
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(
        str(path),
        map_size=RAW_MAP_SIZE,
        max_dbs=64,
        sync=True,
        metasync=True,
        readahead=False,
        writemap=False,
        max_readers=256,
        lock=True,
    )
    try:
        states_db = env.open_db(b"states", create=True)
        inbox_db = env.open_db(b"inbox", create=True)
        pack = msgpack.Packer(use_bin_type=True).pack
        # The engine's own compiled encoders, so both sides pay the same encoding cost.
        codec = RecordCodec(SectorState, [Advance], SCHEMA)
        encode_event = codec.encode_event
        encode_state = codec.state_encoder
        prefix = GROUP.encode() + b"\x00"
        keys = [prefix + id_key(i) for i in range(machines)]
        states = [SectorState() for _ in range(machines)]
        with env.begin(write=True) as txn:  # the machines exist before, as after `begin`
            for key, st in zip(keys, states, strict=True):
                txn.put(key, pack([SCHEMA, False, None, encode_state(st)]), db=states_db)
            # One resident inbox record (another group's pending event). Without it the inbox
            # is empty between puts, and LMDB allocates and frees a fresh root page for every
            # put/delete pair, which makes this loop ~3x slower than the design's real limit.
            sentinel = b"other\x00" + id_key(0) + seq_key(0)
            txn.put(sentinel, pack([SCHEMA, "Advance", {"n": 0}]), db=inbox_db)
        seq = 0
        done = 0
        t0 = time.perf_counter()
        while done < transitions:
            end = min(transitions, done + batch)
            with env.begin(write=True) as txn:
                put = txn.put
                delete = txn.delete
                for j in range(done, end):
                    m = j % machines
                    st = states[m]
                    event = Advance(st.n + 1)
                    seq += 1
                    ikey = keys[m] + seq_key(seq)
                    put(ikey, encode_event(event), db=inbox_db)
                    delete(ikey, db=inbox_db)
                    apply_advance(st, event)
                    put(keys[m], pack([SCHEMA, False, None, encode_state(st)]), db=states_db)
            done = end
        elapsed = time.perf_counter() - t0
    finally:
        env.close()
    return transitions / elapsed
