"""DevnetChain: a SIMULATED devnet chain, persisted in the engine's store.

This is not a Filecoin node. It keeps just enough chain state for the sealing pipeline to run
its real control flow: epochs driven by the engine clock, messages that are included after a
delay and executed with exit codes, ticket and beacon randomness, precommits, active sectors,
deals, sector numbers allocated, and verification of the sealer's proofs.

Persistence: only inputs are stored (messages, deals, reorgs, genesis), in the `devnet`
sub-database, staged through the store's group commit. Chain state (precommits, sectors) is
derived from them, so a handler that sends a message and then its event in the same tick
commits both atomically, and a crash can never leave one without the other.

Fault injection (`DevnetChain.faults`) drives every failure path in the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..fsm import Clock, LmdbStore, StoreError
from ..fsm.codec import field_names, packb, unpackb
from .chain import (
    ChainApiError,
    ChainParams,
    DealProposal,
    ExitCode,
    PreCommitOnChain,
    PreCommitParams,
    ProveCommit,
    Receipt,
    SectorOnChain,
)
from .proofs import verify_porep

log = logging.getLogger("sectorfsm.sealing.devnet")

DB = "devnet"
PRECOMMIT = "PreCommitSector"
PRECOMMIT_BATCH = "PreCommitSectorBatch"
PROVE_COMMIT = "ProveCommitSector"
PROVE_COMMIT_AGGREGATE = "ProveCommitAggregate"
TERMINATE = "TerminateSectors"


@dataclass(slots=True)
class Faults:
    """Knobs the tests turn to drive failure paths (none are persisted)."""

    #: Fail the next N read calls with `ChainApiError`.
    api_errors: int = 0
    #: Per method, exit codes for the next messages of that method (consumed in order).
    message_exits: dict[str, list[ExitCode]] = field(default_factory=dict)
    #: Make `send_*` raise (the message is not sent) for the next N sends.
    send_errors: int = 0
    #: Sectors whose proofs the chain rejects even if they are valid.
    reject_proofs: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Message:
    cid: str
    method: str
    sectors: list[int]
    payload: Any
    value: int
    sent_epoch: int
    include_epoch: int
    forced_exit: int | None = None


class DevnetChain:
    """A simulated chain for one miner; see the module docstring."""

    def __init__(
        self,
        store: LmdbStore,
        clock: Clock,
        params: ChainParams | None = None,
        *,
        miner: int = 1000,
    ) -> None:
        self.store = store
        self.clock = clock
        self.miner = miner
        self.faults = Faults()
        self._db = store.db(DB)
        self._messages: dict[str, _Message] = {}
        self._order: list[str] = []
        #: Per sector, the messages naming it in send order (`find_message` runs per sector).
        self._by_sector: dict[int, list[str]] = {}
        self._deals: dict[int, DealProposal] = {}
        self._reorgs: list[tuple[int, int]] = []  # (from_epoch, salt)
        self._applied = 0
        self._precommits: dict[int, PreCommitOnChain] = {}
        self._sectors: dict[int, SectorOnChain] = {}
        self._allocated: set[int] = set()
        self._receipts: dict[str, Receipt] = {}
        self._reorg_listeners: list[Callable[[int], None]] = []
        self._receipt_listeners: list[Callable[[str, Receipt], None]] = []
        self._fee = 1_000_000_000
        self.params, self._genesis = self._load(params)
        #: Messages sent before this start are replayed, not executed anew: not reported.
        self._replayed = len(self._order)

    # -- persistence ------------------------------------------------------------------------

    def _load(self, params: ChainParams | None) -> tuple[ChainParams, float]:
        with self.store.read() as txn:
            raw = txn.get(b"params", db=self._db)
            items = list(txn.cursor(db=self._db)) if raw is not None else []
        if raw is None:
            chosen = params or ChainParams.devnet()
            genesis = self.clock.now() - chosen.start_epoch * chosen.block_time
            record = {"params": dataclasses.asdict(chosen), "genesis": genesis}

            def init(txn: Any) -> None:
                txn.put(b"params", packb(record), db=self._db)

            self.store.write(init)
            return chosen, genesis
        try:
            record = unpackb(raw)
            stored = ChainParams(**record["params"])
        except Exception as exc:
            raise self._unreadable(b"params", exc) from exc
        if params is not None and params != stored:
            log.warning("devnet: keeping the stored chain parameters (%s)", stored.name)
        for key, value in items:
            try:
                if key.startswith(b"msg/"):
                    m = _Message(**unpackb(value))
                    self._messages[m.cid] = m
                    self._order.append(m.cid)
                elif key.startswith(b"deal/"):
                    d = unpackb(value)
                    self._deals[d["deal_id"]] = DealProposal(**d)
                elif key.startswith(b"reorg/"):
                    r = unpackb(value)
                    self._reorgs.append((r[0], r[1]))
            except Exception as exc:
                raise self._unreadable(key, exc) from exc
        self._order.sort(key=lambda c: int(c.rsplit("-", 1)[1]))
        for cid in self._order:
            self._index(self._messages[cid])
        return stored, float(record["genesis"])

    def _unreadable(self, key: bytes, exc: Exception) -> StoreError:
        """The refusal to start on a chain record that cannot be read.

        Unlike a sector record, a chain record cannot be set aside: the chain is replayed from
        all of them. Without a message, later message ids (numbered by count) would be issued
        again and overwrite the next stored message; without a deal or a reorg, deal checks and
        seed randomness would change under sectors already sealed against them. A chain
        silently reset or guessed would mis-commit sectors, so the engine does not start.
        """
        why = str(exc) or type(exc).__name__
        name = key.decode(errors="backslashreplace")
        return StoreError(
            f"devnet record {name!r} in {self.store.path} cannot be read ({why}); the "
            "simulated chain cannot be replayed without it, so the engine does not start "
            "(nothing was changed): restore the store directory from a backup"
        )

    def _stage(self, key: bytes, value: Any) -> None:
        # Staged in the store's group commit: lands with whatever the caller stages next.
        self.store.committer.put(DB, key, packb(value))

    # -- time -------------------------------------------------------------------------------

    def head(self) -> int:
        """The current epoch, from the engine clock."""
        self._api()
        return self._head()

    def _head(self) -> int:
        now = self.clock.now()
        head = int((now - self._genesis) // self.params.block_time)
        # The division can round down across a boundary: `wait_epoch(e)` wakes at exactly
        # `epoch_time(e)`, and the head must then be `e`, or a handler that waits for `e`
        # and looks again would find it still ahead and (the wait being over) spin.
        if self.epoch_time(head + 1) <= now:
            head += 1
        return head

    def epoch_time(self, epoch: int) -> float:
        """When `epoch` starts on the engine clock."""
        return self._genesis + epoch * self.params.block_time

    async def wait_epoch(self, epoch: int) -> None:
        """Wait until the head reaches `epoch`."""
        await self.clock.sleep_until(self.epoch_time(epoch))

    def _api(self) -> None:
        if self.faults.api_errors > 0:
            self.faults.api_errors -= 1
            raise ChainApiError("devnet: injected API error")

    # -- randomness -------------------------------------------------------------------------

    def ticket_randomness(self, epoch: int) -> bytes:
        """Ticket randomness for this miner at `epoch`."""
        self._api()
        return hashlib.sha256(b"ticket/%d/%d" % (self.miner, epoch)).digest()

    def beacon_randomness(self, epoch: int) -> bytes:
        """Beacon randomness at `epoch`; a reorg at or before `epoch` changes it."""
        self._api()
        salt = sum(s for e, s in self._reorgs if e <= epoch)
        return hashlib.sha256(b"beacon/%d/%d/%d" % (self.miner, epoch, salt)).digest()

    def reorg(self, from_epoch: int) -> None:
        """Fault injection: a reorg that changes beacon randomness from `from_epoch` on."""
        salt = len(self._reorgs) + 1
        self._reorgs.append((from_epoch, salt))
        self._stage(b"reorg/%08d" % salt, [from_epoch, salt])
        for listener in list(self._reorg_listeners):
            listener(from_epoch)

    def on_reorg(self, listener: Callable[[int], None]) -> None:
        """Call `listener(from_epoch)` after each reorg."""
        self._reorg_listeners.append(listener)

    def on_receipt(self, listener: Callable[[str, Receipt], None]) -> None:
        """Call `listener(method, receipt)` as each message sent since the start executes."""
        self._receipt_listeners.append(listener)

    # -- deals ------------------------------------------------------------------------------

    def publish_deal(
        self,
        piece_cid: str,
        piece_size: int,
        start_epoch: int,
        end_epoch: int,
        *,
        provider: int | None = None,
        verified: bool = False,
    ) -> DealProposal:
        """Publish a storage deal (what a client and market actor would do)."""
        deal_id = max(self._deals, default=0) + 1
        deal = DealProposal(
            deal_id,
            piece_cid,
            piece_size,
            self.miner if provider is None else provider,
            start_epoch,
            end_epoch,
            publish_cid=f"bafy2bzpublish-{deal_id}",
            verified=verified,
        )
        self._put_deal(deal)
        return deal

    def _put_deal(self, deal: DealProposal) -> None:
        self._deals[deal.deal_id] = deal
        self._stage(b"deal/%012d" % deal.deal_id, dataclasses.asdict(deal))

    def alter_deal(self, deal_id: int, **changes: Any) -> DealProposal:
        """Fault injection: change a published deal (e.g. its start epoch or piece CID)."""
        deal = dataclasses.replace(self._deals[deal_id], **changes)
        self._put_deal(deal)
        return deal

    def republish_deal(self, deal_id: int) -> DealProposal:
        """Fault injection: the deal is re-published under a new id (the old id disappears)."""
        old = self._deals.pop(deal_id)
        self.store.committer.delete(DB, b"deal/%012d" % deal_id)
        new = dataclasses.replace(old, deal_id=max(max(self._deals, default=0), deal_id) + 1)
        self._put_deal(new)
        return new

    def deal(self, deal_id: int) -> DealProposal | None:
        """A published deal, or None."""
        self._api()
        return self._deals.get(deal_id)

    def deal_by_publish_cid(self, publish_cid: str, piece_cid: str) -> DealProposal | None:
        """The deal a publish message created for `piece_cid` (Lotus `GetCurrentDealInfo`)."""
        self._api()
        for d in self._deals.values():
            if d.publish_cid == publish_cid and d.piece_cid == piece_cid:
                return d
        return None

    # -- state ------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Execute every message included by now, in send order."""
        head = self._head()
        while self._applied < len(self._order):
            m = self._messages[self._order[self._applied]]
            if m.include_epoch > head:
                break
            receipt = self._receipts[m.cid] = self._execute(m)
            self._applied += 1
            if self._applied > self._replayed:
                for listener in self._receipt_listeners:
                    listener(m.method, receipt)

    def _execute(self, m: _Message) -> Receipt:
        if m.forced_exit is not None:
            return Receipt(ExitCode(m.forced_exit), m.include_epoch, "injected failure")
        epoch = m.include_epoch
        if m.method in (PRECOMMIT, PRECOMMIT_BATCH):
            infos = [PreCommitParams(**{**p, "deal_ids": tuple(p["deal_ids"])}) for p in m.payload]
            for p in infos:
                if p.number in self._allocated:
                    return Receipt(
                        ExitCode.ErrIllegalArgument, epoch, f"sector {p.number} already allocated"
                    )
            share = m.value // max(1, len(infos))
            for p in infos:
                self._allocated.add(p.number)
                self._precommits[p.number] = PreCommitOnChain(p, epoch, share)
            return Receipt(ExitCode.Ok, epoch)
        if m.method in (PROVE_COMMIT, PROVE_COMMIT_AGGREGATE):
            proofs = [ProveCommit(p["number"], p["proof"]) for p in m.payload]
            for pc in proofs:
                why = self._check_prove_commit(pc, epoch)
                if why:
                    return Receipt(ExitCode.ErrIllegalArgument, epoch, why)
            for pc in proofs:
                pre = self._precommits.pop(pc.number)
                self._sectors[pc.number] = SectorOnChain(
                    pc.number, pre.info.sealed_cid, epoch, pre.info.expiration, pre.info.deal_ids
                )
            return Receipt(ExitCode.Ok, epoch)
        if m.method == TERMINATE:
            for n in m.payload:
                self._sectors.pop(n, None)
            return Receipt(ExitCode.Ok, epoch)
        return Receipt(ExitCode.ErrIllegalArgument, epoch, f"unknown method {m.method}")

    def _check_prove_commit(self, pc: ProveCommit, epoch: int) -> str:
        pre = self._precommits.get(pc.number)
        if pre is None:
            return f"no precommit for sector {pc.number}"
        seed_epoch = pre.precommit_epoch + self.params.pre_commit_challenge_delay
        if epoch <= seed_epoch:
            return f"prove-commit for sector {pc.number} before its seed epoch {seed_epoch}"
        unsealed = pre.info.unsealed_cid or ""
        ok = self._verify(
            pc.number,
            pre.info.sealed_cid,
            unsealed,
            self.ticket_randomness_raw(pre.info.seal_rand_epoch),
            self.beacon_randomness_raw(seed_epoch),
            pc.proof,
        )
        return "" if ok else f"invalid proof for sector {pc.number}"

    def ticket_randomness_raw(self, epoch: int) -> bytes:
        """Ticket randomness without fault injection (the chain's own view)."""
        return hashlib.sha256(b"ticket/%d/%d" % (self.miner, epoch)).digest()

    def beacon_randomness_raw(self, epoch: int) -> bytes:
        """Beacon randomness without fault injection (the chain's own view)."""
        salt = sum(s for e, s in self._reorgs if e <= epoch)
        return hashlib.sha256(b"beacon/%d/%d/%d" % (self.miner, epoch, salt)).digest()

    def sector_allocated(self, number: int) -> bool:
        """True once a sector number was precommitted."""
        self._api()
        self._advance()
        return number in self._allocated

    def precommit_info(self, number: int) -> PreCommitOnChain | None:
        """The precommit on chain, if any."""
        self._api()
        self._advance()
        return self._precommits.get(number)

    def sector_info(self, number: int) -> SectorOnChain | None:
        """The active sector on chain, if any."""
        self._api()
        self._advance()
        return self._sectors.get(number)

    def active_sectors(self) -> list[int]:
        """Numbers of the sectors active on chain."""
        self._advance()
        return sorted(self._sectors)

    def precommit_deposit(self, params: PreCommitParams) -> int:
        """A nominal deposit per sector (devnet: 1 FIL scaled down)."""
        self._api()
        return 10**15

    def base_fee(self) -> int:
        """The base fee (settable for tests through `set_base_fee`)."""
        return self._fee

    def set_base_fee(self, fee: int) -> None:
        """Fault injection / tuning: set the base fee."""
        self._fee = fee

    # -- messages ---------------------------------------------------------------------------

    def _send(self, method: str, sectors: list[int], payload: Any, value: int) -> str:
        if self.faults.send_errors > 0:
            self.faults.send_errors -= 1
            raise ChainApiError(f"devnet: injected send failure for {method}")
        head = self._head()
        seq = len(self._order) + 1
        cid = f"bafy2bzmsg-{method}-{seq}"
        exits = self.faults.message_exits.get(method)
        forced = int(exits.pop(0)) if exits else None
        m = _Message(
            cid,
            method,
            sectors,
            payload,
            value,
            head,
            head + self.params.inclusion_delay,
            forced,
        )
        self._messages[cid] = m
        self._order.append(cid)
        self._index(m)
        self._stage(b"msg/%012d" % seq, _fields_of(m))
        log.debug("devnet: %s %s for sectors %s", cid, method, sectors)
        return cid

    def send_precommits(self, batch: list[PreCommitParams], deposit: int) -> str:
        """Send PreCommitSector (one sector) or PreCommitSectorBatch."""
        method = PRECOMMIT if len(batch) == 1 else PRECOMMIT_BATCH
        payload = [_fields_of(p) for p in batch]
        return self._send(method, [p.number for p in batch], payload, deposit)

    def send_prove_commits(self, proofs: list[ProveCommit], aggregate: bool) -> str:
        """Send ProveCommitSector (one) or ProveCommitAggregate."""
        method = PROVE_COMMIT_AGGREGATE if aggregate else PROVE_COMMIT
        payload = [{"number": p.number, "proof": p.proof} for p in proofs]
        return self._send(method, [p.number for p in proofs], payload, 0)

    def send_terminate(self, numbers: list[int]) -> str:
        """Send TerminateSectors."""
        return self._send(TERMINATE, list(numbers), list(numbers), 0)

    def find_message(self, method: str, number: int) -> str | None:
        """The latest message of `method` (a prefix such as "PreCommit") naming `number`."""
        for cid in reversed(self._by_sector.get(number, ())):
            if self._messages[cid].method.startswith(method):
                return cid
        return None

    def _index(self, m: _Message) -> None:
        for n in dict.fromkeys(m.sectors):
            self._by_sector.setdefault(n, []).append(m.cid)

    def messages(self, method: str | None = None) -> list[tuple[str, str, list[int]]]:
        """`(cid, method, sectors)` of every message sent, oldest first (for tests and views)."""
        out = []
        for cid in self._order:
            m = self._messages[cid]
            if method is None or m.method.startswith(method):
                out.append((cid, m.method, list(m.sectors)))
        return out

    def search_msg(self, cid: str) -> Receipt | None:
        """The receipt if the message executed, else None."""
        self._api()
        self._advance()
        return self._receipts.get(cid)

    async def wait_msg(self, cid: str, confidence: int) -> Receipt:
        """Wait for the message's execution plus `confidence` epochs."""
        m = self._messages.get(cid)
        if m is None:
            raise ChainApiError(f"devnet: unknown message {cid}")
        await self.wait_epoch(m.include_epoch + confidence)
        self._api()
        self._advance()
        return self._receipts[cid]

    def verify_seal(
        self,
        number: int,
        sealed_cid: str,
        unsealed_cid: str,
        ticket: bytes,
        seed: bytes,
        proof: bytes,
    ) -> bool:
        """Check a proof against the deterministic PoRep stand-in (see `proofs.py`)."""
        self._api()
        return self._verify(number, sealed_cid, unsealed_cid, ticket, seed, proof)

    def _verify(
        self, number: int, sealed: str, unsealed: str, ticket: bytes, seed: bytes, proof: bytes
    ) -> bool:
        if number in self.faults.reject_proofs:
            return False
        return verify_porep(self.miner, number, sealed, unsealed, ticket, seed, proof)


def _fields_of(obj: Any) -> dict[str, Any]:
    """A flat dataclass's fields as a dict, for `packb` (not a deep copy like `asdict`).

    Messages and their parameters hold only scalars, tuples and plain containers, packed at
    once: `asdict` copied every one of them again, once per message sent.
    """
    return {name: getattr(obj, name) for name in field_names(type(obj))}
