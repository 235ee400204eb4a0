"""Every event's `apply()` effect on SectorInfo (Lotus `fsm_events.go@v1.11.3`), and globals."""

from __future__ import annotations

from typing import Any

import pytest

from sectorfsm.sealing import events as ev
from sectorfsm.sealing.info import DealInfo, PendingPiece, Piece, SectorInfo
from sectorfsm.sealing.states import SectorState

DEAL = DealInfo(7, "bafypub", 100, 200)
PIECE = Piece("baga-piece", 128, DEAL)


def applied(event: ev.SectorEvent, **start: Any) -> SectorInfo:
    info = SectorInfo(**start)
    event.apply(info, 1_700_000_000.5)
    return info


def test_creating_events_set_identity() -> None:
    info = applied(ev.SectorStartCC(5, 8))
    assert (info.number, info.sector_type, info.sector_size) == (5, 8, 32 << 30)
    info = applied(ev.SectorStart(6, 5))
    assert (info.number, info.sector_size) == (6, 2048)


def test_piece_events() -> None:
    pending = PendingPiece("baga-piece", 128, DEAL)
    info = applied(ev.SectorAddPiece([pending]))
    assert info.creation_time == 1_700_000_000 and info.pending_pieces == [pending]
    again = applied(ev.SectorAddPiece(), creation_time=5)
    assert again.creation_time == 5  # only the first piece stamps it
    info = applied(ev.SectorPieceAdded([PIECE]), pending_pieces=[pending])
    assert info.pieces == [PIECE] and info.pending_pieces == []
    other = PendingPiece("baga-other", 128, DealInfo(8))
    info = applied(
        ev.SectorAddPieceFailed("x", added=[PIECE], dropped=[other]),
        pending_pieces=[pending, other],
    )
    assert info.pieces == [PIECE] and info.pending_pieces == []
    untried = applied(
        ev.SectorAddPieceFailed("x", dropped=[other]), pending_pieces=[pending, other]
    )
    assert untried.pending_pieces == [pending]  # untried pieces stay for the retry
    filler = Piece("baga-zero", 128, DEAL)  # a filler never carries a deal
    info = applied(ev.SectorPacked([filler]))
    assert info.pieces == [Piece("baga-zero", 128, None)]


def test_sealing_outputs() -> None:
    info = applied(ev.SectorTicket(b"t", 90))
    assert (info.ticket_value, info.ticket_epoch) == (b"t", 90)
    info = applied(ev.SectorPreCommit1(b"pc1"), precommit2_fails=3)
    assert info.precommit1_out == b"pc1" and info.precommit2_fails == 0
    info = applied(ev.SectorPreCommit2("bagboea-r", "baga-d"))
    assert (info.comm_r, info.comm_d) == ("bagboea-r", "baga-d")
    info = applied(ev.SectorPreCommitBatchSent("msg1"))
    assert info.precommit_message == "msg1"
    info = applied(ev.SectorPreCommitted("msg2", 42))
    assert (info.precommit_message, info.precommit_deposit) == ("msg2", 42)
    assert applied(ev.SectorPreCommitLanded(77)).precommit_tipset == 77
    info = applied(ev.SectorSeedReady(b"s", 99))
    assert (info.seed_value, info.seed_epoch) == (b"s", 99)
    assert applied(ev.SectorCommitted(b"p")).proof == b"p"
    assert applied(ev.SectorProofReady(b"q")).proof == b"q"
    assert applied(ev.SectorCommitSubmitted("c1")).commit_message == "c1"
    assert applied(ev.SectorCommitAggregateSent("c2")).commit_message == "c2"


def test_counters() -> None:
    info = applied(
        ev.SectorSealPreCommit1Failed("x"), invalid_proofs=2, precommit2_fails=2, precommit1_fails=1
    )
    assert (info.invalid_proofs, info.precommit2_fails, info.precommit1_fails) == (0, 0, 2)
    info = applied(ev.SectorSealPreCommit2Failed("x"), invalid_proofs=2, precommit2_fails=1)
    assert (info.invalid_proofs, info.precommit2_fails) == (0, 2)
    assert applied(ev.SectorRetryComputeProof(), invalid_proofs=1).invalid_proofs == 2
    assert applied(ev.SectorRetryInvalidProof()).invalid_proofs == 1
    info = applied(ev.SectorRetryNow(), retries=5, retry_at=9.0)
    assert (info.retries, info.retry_at) == (0, 0.0)


def test_deal_id_recovery() -> None:
    assert applied(ev.SectorInvalidDealIDs("PreCommit1")).return_state == "PreCommit1"
    info = applied(ev.SectorUpdateDealIDs({0: 9}), pieces=[Piece("a", 128, DealInfo(7))])
    assert info.pieces[0].deal is not None and info.pieces[0].deal.deal_id == 9


def test_fault_and_termination_fields() -> None:
    assert applied(ev.SectorFaultReported("f")).fault_report_msg == "f"
    assert applied(ev.SectorTerminating("t")).terminate_message == "t"
    assert applied(ev.SectorTerminating(None)).terminate_message is None
    assert applied(ev.SectorTerminated(500)).terminated_at == 500


@pytest.mark.parametrize(
    "event",
    [
        ev.SectorOldTicket(),
        ev.SectorStartPacking(),
        ev.SectorPreCommitBatch(),
        ev.SectorChainPreCommitFailed("x"),
        ev.SectorComputeProofFailed("x"),
        ev.SectorCommitFailed("x"),
        ev.SectorProving(),
        ev.SectorFinalized(),
        ev.SectorFaultedFinal(),
        ev.SectorRemoved(),
    ],
)
def test_events_without_effects_change_nothing(event: ev.SectorEvent) -> None:
    assert applied(event) == SectorInfo()


def test_global_events() -> None:
    info = SectorInfo(state=SectorState.PreCommit1)
    assert ev.SectorForceState(SectorState.WaitSeed).apply_global(info) is True
    assert info.state is SectorState.WaitSeed
    assert ev.SectorRemove().apply_global(info) and info.state is SectorState.Removing
    assert ev.SectorTerminate().apply_global(info) and info.state is SectorState.Terminating
    assert ev.SectorFatalError("x").apply_global(info) and info.state is SectorState.Terminating
    info = SectorInfo(state=SectorState.CommitFailed)
    assert ev.SectorRetriesExhausted("spent").apply_global(info)
    assert info.state is SectorState.FailedUnrecoverable
    assert (info.unrecoverable_from, info.last_err) == ("CommitFailed", "spent")
    with pytest.raises(TypeError):
        ev.SectorPacked().apply_global(info)
    assert {c.__name__ for c in ev.GLOBAL_EVENTS} == {
        "SectorFatalError",
        "SectorForceState",
        "SectorTerminate",
        "SectorRemove",
        "SectorRetriesExhausted",
    }


def test_log_message_keeps_errors_in_the_trace() -> None:
    message, trace = ev.SectorCommitFailed("boom").describe()
    assert message == '{"User":{}}' and trace == "boom"
    message, _ = ev.SectorTicket(b"\x01\x02", 3).describe()
    assert message == '{"User":{"ticket_epoch":3,"ticket_value":"0102"}}'
