"""Every event's `apply()` effect on SectorInfo (Lotus `fsm_events.go@v1.11.3`), globals,
and the registry the codec reads (every event, once, under the tag the store keeps)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import pytest

from sectorfsm.sealing import events as ev
from sectorfsm.sealing import graph
from sectorfsm.sealing.info import DealInfo, PendingPiece, Piece, SectorInfo
from sectorfsm.sealing.states import SectorState
from sectorfsm.sealing.store_view import sector_codec

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


def test_pieces_are_described_without_the_json_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every CC sector's SectorPacked lists its filler piece (a dataclass of plain values).
    from sectorfsm.sealing.events import base

    event = ev.SectorPacked([Piece("baga-filler", 2048), PIECE])
    want = _json_of_fields(event)

    def boom(value: Any) -> str:
        raise AssertionError(f"encoder run for {value!r}")

    monkeypatch.setattr(base._JSON, "encode", boom)
    assert event.describe() == (want, "")


def _json_of_fields(event: ev.SectorEvent) -> str:
    """The message as `describe` wrote it before its fast path: JSON of every field but error."""

    def jsonable(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, list | tuple):
            return [jsonable(v) for v in value]
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        return value

    fields = {
        f.name: jsonable(getattr(event, f.name))
        for f in dataclasses.fields(event)
        if f.name != "error"
    }
    return json.dumps({"User": fields}, separators=(",", ":"), sort_keys=True)


#: One value of each kind a field can hold (the message is JSON of whatever is there).
SAMPLES: list[Any] = [
    'naïve "quoted" \\ tab\t line\n \u2603 \U0001f600',
    "",
    0,
    -(1 << 70),
    True,
    False,
    None,
    b"\x00\xff\x10",
    b"",
    1.5,
    SectorState.Proving,
    [PIECE, PendingPiece("baga", 128, DEAL)],
    (1, b"\x01"),
    {"b": 1, "a": [b"\x02"], 3: None},
    DEAL,
]


@pytest.mark.parametrize("sample", SAMPLES, ids=range(len(SAMPLES)))
def test_log_message_is_the_json_of_the_fields_for_every_event_and_value(sample: Any) -> None:
    for cls in ev.registered_events():
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: "err" if n == "error" else sample for n in names}
        for event in (cls(), cls(**values)):  # type: ignore[arg-type]
            message, trace = event.describe()
            assert message == _json_of_fields(event), cls.__name__
            assert trace == (str(event.error) if "error" in names else "")  # type: ignore[attr-defined]


# -- the registry ------------------------------------------------------------------------------

#: The tags stored before events became a package (one per event class): a store written then
#: must still decode, so none may be renamed or dropped.
STORED_TAGS = frozenset(
    [
        "SectorAddPiece",
        "SectorAddPieceFailed",
        "SectorChainPreCommitFailed",
        "SectorCommitAggregateSent",
        "SectorCommitFailed",
        "SectorCommitSubmitted",
        "SectorCommitted",
        "SectorComputeProofFailed",
        "SectorDealsExpired",
        "SectorFatalError",
        "SectorFaultReported",
        "SectorFaultedFinal",
        "SectorFaulty",
        "SectorFinalizeFailed",
        "SectorFinalized",
        "SectorForceState",
        "SectorInvalidDealIDs",
        "SectorOldTicket",
        "SectorPacked",
        "SectorPieceAdded",
        "SectorPreCommit1",
        "SectorPreCommit2",
        "SectorPreCommitBatch",
        "SectorPreCommitBatchSent",
        "SectorPreCommitLanded",
        "SectorPreCommitted",
        "SectorProofReady",
        "SectorProving",
        "SectorRemove",
        "SectorRemoveFailed",
        "SectorRemoved",
        "SectorRetriesExhausted",
        "SectorRetryCommitWait",
        "SectorRetryComputeProof",
        "SectorRetryFinalize",
        "SectorRetryInvalidProof",
        "SectorRetryNow",
        "SectorRetryPreCommit",
        "SectorRetryPreCommitWait",
        "SectorRetrySealPreCommit1",
        "SectorRetrySealPreCommit2",
        "SectorRetrySubmitCommit",
        "SectorRetryWaitDeals",
        "SectorRetryWaitSeed",
        "SectorSealPreCommit1Failed",
        "SectorSealPreCommit2Failed",
        "SectorSeedReady",
        "SectorStart",
        "SectorStartCC",
        "SectorStartPacking",
        "SectorSubmitCommitAggregate",
        "SectorTerminate",
        "SectorTerminateFailed",
        "SectorTerminated",
        "SectorTerminating",
        "SectorTicket",
        "SectorTicketExpired",
        "SectorUpdateDealIDs",
    ]
)

#: Event records as the single-module `events.py` encoded them (msgpack, hex), with the event
#: each must decode to: the tags and the field names of the stored format.
STORED_RECORDS = [
    (
        ev.SectorAddPiece([PendingPiece("baga-p", 128, DealInfo(7, "bafypub", 100, 200))]),
        "9301ae536563746f72416464506965636581a67069656365739184a970696563655f636964a6626167612d"
        "70a473697a65cc80a46465616c85a76465616c5f696407ab7075626c6973685f636964a762616679707562"
        "ab73746172745f65706f636864a9656e645f65706f6368ccc8ad6b6565705f756e7365616c6564c3a9646174"
        "615f70617468c0",
    ),
    (
        ev.SectorTicket(b"\x01\x02", 90),
        "9301ac536563746f725469636b657482ac7469636b65745f76616c7565c4020102ac7469636b65745f6570"
        "6f63685a",
    ),
    (
        ev.SectorForceState(SectorState.WaitSeed),
        "9301b0536563746f72466f726365537461746581a57374617465a85761697453656564",
    ),
    (ev.SectorRetryNow(), "9301ae536563746f7252657472794e6f7780"),
    (ev.SectorRetryFinalize(), "9301b3536563746f72526574727946696e616c697a6580"),
    (
        ev.SectorUpdateDealIDs({0: 9}),
        "9301b3536563746f725570646174654465616c49447381a775706461746573810009",
    ),
    (
        ev.SectorTerminating(None),
        "9301b1536563746f725465726d696e6174696e6781a76d657373616765c0",
    ),
    (
        ev.SectorRetriesExhausted("spent"),
        "9301b6536563746f725265747269657345786861757374656481a56572726f72a57370656e74",
    ),
]

NEW_MODULE = """
from __future__ import annotations

from dataclasses import dataclass

from sectorfsm.sealing.events import SectorEvent
from sectorfsm.sealing.info import SectorInfo


@dataclass(frozen=True, slots=True)
class SectorProbeOnly(SectorEvent):
    note: str = ""

    def apply(self, info: SectorInfo, now: float) -> None:
        info.last_err = self.note
"""


def test_stored_tags_are_unchanged() -> None:
    assert set(ev.EVENTS_BY_NAME) == STORED_TAGS
    assert len(ev.ALL_EVENTS) == len(STORED_TAGS)


@pytest.mark.parametrize(("event", "stored"), STORED_RECORDS, ids=lambda x: type(x).__name__)
def test_records_stored_by_the_old_module_decode_and_encode_alike(
    event: ev.SectorEvent, stored: str
) -> None:
    codec = sector_codec()
    data = bytes.fromhex(stored)
    assert codec.decode_event(data, "stored") == event
    assert codec.encode_event(event) == data


def test_the_registry_holds_each_exported_event_once_as_its_slotted_class() -> None:
    exported = {
        name: obj
        for name in ev.__all__
        if isinstance(obj := getattr(ev, name), type) and obj is not ev.SectorEvent
    }
    assert exported == ev.EVENTS_BY_NAME
    # `@dataclass(slots=True)` defines each class twice: the registry keeps the second.
    assert all("__slots__" in vars(cls) for cls in ev.ALL_EVENTS)
    assert all(dataclasses.is_dataclass(cls) for cls in ev.ALL_EVENTS)


def test_importing_the_package_imports_every_module_in_it() -> None:
    modules = {m.name for m in pkgutil.iter_modules(ev.__path__)}
    assert {"base", "lifecycle", "recovery", "proving", "global_events"} <= modules
    assert all(f"{ev.__name__}.{name}" in sys.modules for name in modules)


def test_every_event_the_graph_names_is_registered() -> None:
    named = {e.event for e in graph.EDGES} - {graph.RESTART, graph.STEP_FAILED}
    assert named and named <= set(ev.EVENTS_BY_NAME)


def test_an_event_in_a_new_module_reaches_the_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "probe_events.py").write_text(NEW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cls = importlib.import_module("probe_events").SectorProbeOnly
        assert ev.EVENTS_BY_NAME["SectorProbeOnly"] is cls and cls in ev.ALL_EVENTS
        assert "__slots__" in vars(cls)
        codec = sector_codec()
        event = cls("kept")
        assert codec.decode_event(codec.encode_event(event), "probe") == event
    finally:
        ev.EVENTS_BY_NAME.pop("SectorProbeOnly", None)
        sys.modules.pop("probe_events", None)
    assert "SectorProbeOnly" not in {c.__name__ for c in ev.ALL_EVENTS}


def test_a_second_event_with_a_taken_name_is_refused() -> None:
    before = dict(ev.EVENTS_BY_NAME)
    with pytest.raises(TypeError, match=r"two sector events are named 'SectorPacked'.*rename"):

        @dataclasses.dataclass(frozen=True, slots=True)
        class SectorPacked(ev.SectorEvent):
            """A different event under a stored tag."""

    with pytest.raises(TypeError, match="SectorRetryNow"):

        class SectorRetryNow(ev.SectorEvent):
            """Not even a dataclass yet: refused when the class is defined."""

    assert before == ev.EVENTS_BY_NAME


def test_the_count_key_is_the_plain_state_value_for_every_state() -> None:
    from sectorfsm.sealing.store_view import state_key

    for state in SectorState:
        key = state_key(SectorInfo(state=state))
        assert key == state.value and type(key) is str, state
