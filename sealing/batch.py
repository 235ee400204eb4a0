"""PreCommit batching and commit aggregation (Lotus v1.11.3 `precommit_batch.go`,
`commit_batch.go`).

A handler adds its sector and waits. A batch goes out when it is full, when the oldest entry
has waited `*_batch_wait`, or when the earliest cutoff (ticket expiry or deal start for
precommits, the prove-commit deadline or deal start for commits) minus `*_batch_slack` is
reached. When it goes out, the batcher sends each sector's event in the same tick as the
message, so the message and the events commit together. In-flight batches are not
persisted (as in Lotus): after a restart the handlers re-add their sectors, and a sector
whose message was already sent finds it on chain instead. The batch wait is timed from when
the sector entered the batch state (its log), so restarts do not keep postponing a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..fsm import Context, GroupStoppedError
from .chain import ChainApiError, PreCommitParams, ProveCommit
from .checks import CheckError, check_commit
from .events import (
    SectorChainPreCommitFailed,
    SectorCommitAggregateSent,
    SectorCommitFailed,
    SectorPreCommitBatchSent,
    SectorRetrySubmitCommit,
)
from .info import SectorInfo

if TYPE_CHECKING:
    from .pipeline import Sealing

log = logging.getLogger("sectorfsm.sealing.batch")


@dataclass(slots=True)
class _Entry:
    number: int
    ctx: Context
    info: SectorInfo
    cutoff: float
    added: float
    done: asyncio.Future[None]
    params: PreCommitParams | None = None
    deposit: int = 0


class _Batcher:
    """Shared mechanics: entries, the flush timer, and a flush lock."""

    kind = ""

    def __init__(self, s: Sealing, max_batch: int, wait: float, slack: float) -> None:
        self.s = s
        self.max_batch = max_batch
        self.wait = wait
        self.slack = slack
        self._entries: dict[int, _Entry] = {}
        self._timer: asyncio.Task[None] | None = None
        self._timer_due = 0.0
        #: Messages sent, with their sector counts (for tests and views).
        self.sent: list[tuple[str, int]] = []

    def pending(self) -> list[int]:
        """Sector numbers waiting in the batch."""
        return sorted(self._entries)

    async def _add(self, entry: _Entry) -> None:
        old = self._entries.get(entry.number)
        if old is not None and not old.done.done():
            old.done.cancel()
        self._entries[entry.number] = entry
        if len(self._entries) >= self.max_batch:
            self.flush()
        elif old is not None or self._timer is None:
            self._rearm()
        else:
            # O(1) per sector: only an entry due before the armed timer moves it. (An entry
            # replaced above can make the timer early; it then re-checks and sleeps on.)
            due = min(entry.added + self.wait, entry.cutoff - self.slack)
            if due < self._timer_due:
                self._rearm()
        try:
            await entry.done
        finally:
            if self._entries.get(entry.number) is entry:
                del self._entries[entry.number]  # cancelled (remove/terminate): leave the batch
                self._rearm()

    def _due(self) -> float:
        oldest = min(e.added for e in self._entries.values())
        cutoff = min(e.cutoff for e in self._entries.values())
        return min(oldest + self.wait, cutoff - self.slack)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._entries:
            return
        due = self._due()
        if due <= self.s.clock.now():
            asyncio.get_running_loop().call_soon(self.flush)
            return
        self._timer_due = due
        self._timer = asyncio.get_running_loop().create_task(self._sleep_then_flush(due))

    async def _sleep_then_flush(self, due: float) -> None:
        clock = self.s.clock
        while True:
            await clock.sleep_until(due)
            if not self._entries:
                break
            due = self._due()  # (the entry that set the timer may have left since)
            if due <= clock.now():
                break
            self._timer_due = due
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send what is batched now."""
        entries = [e for e in self._entries.values() if not e.done.done()]
        self._entries.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not entries:
            return
        for chunk in _chunks(entries, self.max_batch):
            try:
                self._send(chunk)
            except GroupStoppedError:
                pass  # stopping: the handlers re-add their sectors at the next start
            except Exception:
                log.exception("%s batch failed", self.kind)
            for e in chunk:
                if not e.done.done():
                    e.done.set_result(None)

    def _send(self, entries: list[_Entry]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the timer (the engine is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _cutoff(info: SectorInfo, deadline: int) -> int:
    """The epoch a batch must go out by: the chain's deadline, or a deal's start if earlier."""
    starts = [p.deal.start_epoch for p in info.pieces if p.deal is not None]
    return min([deadline, *starts])


def _entered(info: SectorInfo, kind: str, now: float) -> float:
    """When the sector joined the batch: its stored log says, so a restart keeps the wait."""
    for entry in reversed(info.log):
        if entry.kind == kind:
            return min(float(entry.timestamp), now)
    return now


def _chunks(entries: list[_Entry], size: int) -> list[list[_Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


def _send_all(entries: list[_Entry], event: Any) -> None:
    for e in entries:
        with contextlib.suppress(GroupStoppedError):
            e.ctx.send(event)


class PreCommitBatcher(_Batcher):
    """Collects precommits into PreCommitSectorBatch messages."""

    kind = "precommit"

    def __init__(self, s: Sealing) -> None:
        c = s.config
        super().__init__(
            s, c.max_pre_commit_batch, c.pre_commit_batch_wait, c.pre_commit_batch_slack
        )

    async def add(
        self, ctx: Context, info: SectorInfo, params: PreCommitParams, deposit: int
    ) -> None:
        """Add a sector's precommit; returns once its batch was sent (or failed)."""
        chain = self.s.chain
        cutoff_epoch = _cutoff(
            info, info.ticket_epoch + chain.params.max_pre_commit_randomness_lookback
        )
        now = _entered(info, "event;SectorPreCommitBatch", self.s.clock.now())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = _Entry(
            info.number, ctx, info, chain.epoch_time(cutoff_epoch), now, fut, params, deposit
        )
        await self._add(entry)

    def _send(self, entries: list[_Entry]) -> None:
        params = [e.params for e in entries if e.params is not None]
        deposit = sum(e.deposit for e in entries)
        try:
            msg = self.s.chain.send_precommits(params, deposit)
        except ChainApiError as exc:
            _send_all(entries, SectorChainPreCommitFailed(f"sending precommit batch: {exc}"))
            return
        self.sent.append((msg, len(entries)))
        _send_all(entries, SectorPreCommitBatchSent(msg))


class CommitBatcher(_Batcher):
    """Collects proofs into ProveCommitAggregate messages (or single ones when not worth it)."""

    kind = "commit"

    def __init__(self, s: Sealing) -> None:
        c = s.config
        super().__init__(s, c.max_commit_batch, c.commit_batch_wait, c.commit_batch_slack)

    async def add(self, ctx: Context, info: SectorInfo) -> None:
        """Add a sector's proof; returns once it was sent (or failed)."""
        chain = self.s.chain
        pci = chain.precommit_info(info.number)
        if pci is None:
            ctx.send(SectorCommitFailed("precommit info not found on chain"))
            return
        cutoff_epoch = _cutoff(info, pci.precommit_epoch + chain.params.max_prove_commit_duration)
        now = _entered(info, "event;SectorSubmitCommitAggregate", self.s.clock.now())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._add(_Entry(info.number, ctx, info, chain.epoch_time(cutoff_epoch), now, fut))

    def _send(self, entries: list[_Entry]) -> None:
        cfg = self.s.config
        chain = self.s.chain
        individually = (
            len(entries) < cfg.min_commit_batch or chain.base_fee() < cfg.aggregate_above_base_fee
        )
        groups = [[e] for e in entries] if individually else [entries]
        for group in groups:
            proofs = [ProveCommit(e.number, e.info.proof, e.info.sector_type) for e in group]
            try:
                msg = chain.send_prove_commits(proofs, aggregate=not individually)
            except ChainApiError as exc:
                for e in group:
                    self._failed(e, exc)
                continue
            self.sent.append((msg, len(group)))
            _send_all(group, SectorCommitAggregateSent(msg))

    def _failed(self, e: _Entry, exc: Exception) -> None:
        # As Lotus: if the sector still checks out, the send is retried; else the commit failed.
        try:
            check_commit(self.s, e.info, e.info.proof)
        except CheckError as bad:
            _send_all([e], SectorCommitFailed(f"commit batch failed, and the check: {bad}"))
            return
        _send_all([e], SectorRetrySubmitCommit())
        log.warning("commit batch for sector %d failed: %s", e.number, exc)
